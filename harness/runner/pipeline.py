"""The strategy pipeline: cache -> host-to-device copy -> compression decode -> prefetch.

This is the only place the strategy families meet; each knows nothing of the others,
and the runner knows nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from harness.measurement.timeline import StageClock
from strategies.cache.base import LayerCache, LayerFiles
from strategies.cache.files import read_layer_file
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
        # Units kept on the device for the whole run, in their stored form (residency): never read again.
        self.resident: dict[str, dict[str, torch.Tensor]] = {}

    def keep_resident(self, files: LayerFiles, names: Sequence[str], decode_with: Codec | None = None) -> int:
        """Load `names` onto the device once, as stored (decoded each pass, like a streamed unit), or decoded
        once by `decode_with` (the pipeline's own codec then being `none`); the bytes kept.

        Read straight from the split, past the cache: a resident unit is never the cache's to hold.
        """
        by_file: dict[object, dict[str, torch.Tensor]] = {}
        for name in names:
            path = files.file(name)
            if path not in by_file:  # tied embed and lm_head share a file, and so one copy
                stored = read_layer_file(path, "warm")
                # copy=True: on a CPU the device tensors would otherwise be views of the file's mapping.
                tensors = {key: t.to(self.device, copy=True) for key, t in stored.items()}
                if decode_with is not None:
                    tensors = decode_with.decode(name, tensors, self.device)
                by_file[path] = tensors
            self.resident[name] = by_file[path]
        return sum(t.nbytes for tensors in by_file.values() for t in tensors.values())

    def stream(self, names: Sequence[str]) -> Iterator[DeviceLayer]:
        """Device-ready layers for one pass, in `names` order."""
        return self.prefetcher.stream(names, self._load)

    def _load(self, name: str) -> DeviceLayer:
        clock = self.clock
        if name in self.resident:
            d0 = clock.device()
            # A new dict: the runner clears the weights it is handed, which must not empty the resident set.
            weights = dict(self.codec.decode(name, self.resident[name], self.device))
            d1 = clock.device()
            decoded = sum(t.nbytes for t in weights.values())
            return DeviceLayer(name, weights, stamps={"decode": (d0, d1)}, bytes={"decode": decoded})
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
