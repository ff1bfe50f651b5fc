"""prefetch: the order and overlap in which layers are loaded relative to compute."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from omegaconf import MISSING

Loaded = TypeVar("Loaded")


@dataclass
class PrefetchConfig:
    name: str = MISSING
    _target_: str = MISSING


class Prefetcher(Protocol):
    def stream(self, names: Sequence[str], load: Callable[[str], Loaded]) -> Iterator[Loaded]:
        """Yield ``load(name)`` for each name, in order; may run loads ahead of the consumer."""
        ...
