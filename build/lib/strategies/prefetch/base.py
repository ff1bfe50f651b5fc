"""prefetch: the order and overlap in which layers are loaded relative to compute."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from strategies.layer import DeviceLayer


class Prefetcher(Protocol):
    # Layers loaded (and so alive on the device) ahead of the one computing: 0 means nothing overlaps.
    layers_ahead: int

    def stream(self, names: Sequence[str], load: Callable[[str], DeviceLayer]) -> Iterator[DeviceLayer]:
        """Yield ``load(name)`` for each name, in order; may run loads ahead of the consumer."""
        ...
