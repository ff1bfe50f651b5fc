"""prefetch: the order and overlap in which layers are loaded relative to compute."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from strategies.layer import DeviceLayer

# What a prefetcher is handed: a unit's name -> its weights on the device, stored; stored -> decoded.
Fetch = Callable[[str], DeviceLayer]
Decode = Callable[[DeviceLayer], DeviceLayer]


class Prefetcher(Protocol):
    # Layers loaded (and so alive on the device) ahead of the one computing: 0 means nothing overlaps.
    layers_ahead: int

    def stream(self, names: Sequence[str], fetch: Fetch, decode: Decode) -> Iterator[DeviceLayer]:
        """Yield ``decode(fetch(name))`` for each name, in order; may run both ahead of the consumer.

        fetch: read and copy to the device (the stored form); decode: the weights from it, on the device.
        """
        ...
