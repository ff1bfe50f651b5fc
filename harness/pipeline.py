"""The strategy pipeline: cache -> compression decode -> prefetch, yielding device-ready layers.

This is the only place the strategy families meet; each knows nothing of the others,
and the runner knows nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from harness.metrics import Clock
from strategies.cache.base import LayerCache
from strategies.compression.base import Codec
from strategies.prefetch.base import Prefetcher


@dataclass
class DeviceLayer:
    """One unit's weights on the compute device, with what it cost to get them there."""

    name: str
    weights: dict[str, torch.Tensor]
    read_s: float
    decode_s: float
    read_bytes: int


class LayerPipeline:
    def __init__(
        self,
        cache: LayerCache,
        codec: Codec,
        prefetcher: Prefetcher,
        device: torch.device,
        clock: Clock,
    ) -> None:
        self.cache = cache
        self.codec = codec
        self.prefetcher = prefetcher
        self.device = device
        self.clock = clock

    def stream(self, names: Sequence[str]) -> Iterator[DeviceLayer]:
        """Device-ready layers for one pass, in `names` order."""
        return self.prefetcher.stream(names, self._load)

    def _load(self, name: str) -> DeviceLayer:
        t0 = self.clock()
        read_before = self.cache.bytes_read
        stored = self.cache.get(name)
        t1 = self.clock()
        weights = self.codec.decode(name, stored, self.device)
        t2 = self.clock()
        return DeviceLayer(name, weights, t1 - t0, t2 - t1, self.cache.bytes_read - read_before)
