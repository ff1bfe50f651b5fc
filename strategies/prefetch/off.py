"""prefetch=off: load a layer, then compute it; nothing overlaps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from strategies.layer import DeviceLayer
from strategies.prefetch.base import Decode, Fetch
from strategies.prefetch.configs import PrefetchOffConfig


class PrefetchOff:
    layers_ahead = 0

    def __init__(self, cfg: PrefetchOffConfig, device: torch.device) -> None:
        self.cfg = cfg

    def stream(self, names: Sequence[str], fetch: Fetch, decode: Decode) -> Iterator[DeviceLayer]:
        for name in names:
            yield decode(fetch(name))
