"""The strategy pipeline: cache -> host-to-device copy -> compression decode -> prefetch.

This is the only place the strategy families meet; each knows nothing of the others,
and the runner knows nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from harness.measurement.timeline import StageClock
from strategies.cache.base import LayerCache
from strategies.compression.base import Codec
from strategies.layer import DeviceLayer
from strategies.prefetch.base import Prefetcher


class LayerPipeline:
    def __init__(
        self,
        cache: LayerCache,
        codec: Codec,
        prefetcher: Prefetcher,
        device: torch.device,
        clock: StageClock,
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
        clock = self.clock
        read_before = self.cache.bytes_read
        r0 = clock.host()
        stored = self.cache.get(name)
        r1 = clock.host()
        # The copy is ours, not the codec's, so that transfer and decode are timed apart.
        h0 = clock.device()
        on_device = {key: t.to(self.device, non_blocking=True) for key, t in stored.items()}
        h1 = clock.device()
        weights = self.codec.decode(name, on_device, self.device)
        d1 = clock.device()
        moved = sum(t.nbytes for t in stored.values() if t.device != self.device)
        return DeviceLayer(
            name,
            weights,
            stamps={"read": (r0, r1), "h2d": (h0, h1), "decode": (h1, d1)},
            bytes={
                "read": self.cache.bytes_read - read_before,
                "h2d": moved,
                "decode": sum(t.nbytes for t in weights.values()),
            },
        )
