"""prefetch=off: load a layer, then compute it; nothing overlaps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from strategies.prefetch.base import Loaded, PrefetchConfig


@dataclass
class PrefetchOffConfig(PrefetchConfig):
    name: str = "off"
    _target_: str = "strategies.prefetch.off.PrefetchOff"


class PrefetchOff:
    def __init__(self, cfg: PrefetchOffConfig, device: torch.device) -> None:
        self.cfg = cfg

    def stream(self, names: Sequence[str], load: Callable[[str], Loaded]) -> Iterator[Loaded]:
        for name in names:
            yield load(name)
