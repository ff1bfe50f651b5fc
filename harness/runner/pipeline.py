"""The strategy pipeline: cache -> host-to-device copy -> compression decode -> prefetch.

This is the only place the strategy families meet; each knows nothing of the others,
and the runner knows nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from harness.measurement.profile import stage_range
from harness.measurement.timeline import StageClock
from strategies.cache.base import LayerCache, LayerFiles
from strategies.cache.files import read_layer_file
from strategies.compression.base import Codec
from strategies.layer import DeviceLayer
from strategies.prefetch.base import Prefetcher


def packed_span(stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """When `stored` are views of one buffer (a packed layer file: `read_packed`), the bytes they cover
    (uint8) and each tensor's start in them; else None."""
    tensors = list(stored.values())
    storage = tensors[0].untyped_storage()
    starts = [t.storage_offset() * t.element_size() for t in tensors]
    lo = min(starts)
    if not all(
        t.untyped_storage().data_ptr() == storage.data_ptr()
        and t.is_contiguous()
        and (start - lo) % t.element_size() == 0  # each view stays aligned to its dtype in the new buffer
        for t, start in zip(tensors, starts, strict=True)
    ):
        return None
    hi = max(start + t.nbytes for t, start in zip(tensors, starts, strict=True))
    return torch.empty(0, dtype=torch.uint8).set_(storage)[lo:hi], [start - lo for start in starts]


def unpack(buffer: torch.Tensor, stored: dict[str, torch.Tensor], starts: list[int]) -> dict[str, torch.Tensor]:
    """`stored`'s tensors as views of `buffer`, a copy of their `packed_span`."""
    return {
        key: buffer[start : start + t.nbytes].view(t.dtype).view(t.shape)
        for (key, t), start in zip(stored.items(), starts, strict=True)
    }


def to_device(stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A unit's host tensors on `device`, asynchronously where the host memory is pinned.

    A packed layer moves in one copy and comes back as views of one device buffer: one transfer per
    layer instead of one per tensor (a 4-bit layer has 30). Already on `device` (the CPU computing on
    mapped files): as is.
    """
    if all(t.device == device for t in stored.values()):
        return dict(stored)
    if (span := packed_span(stored)) is None:
        return {key: t.to(device, non_blocking=True) for key, t in stored.items()}
    host, starts = span
    on_device = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    on_device.copy_(host, non_blocking=True)
    return unpack(on_device, stored, starts)


# The unit whose compute is a row lookup: a pass reads a few of its rows, whatever the table's size.
LOOKUP_UNIT = "embed"


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

    def looks_up_on_host(self, name: str) -> bool:
        """Whether `name` stays on the host, where the runner gathers the rows a pass needs: the embedding, stored
        plain and streamed (not resident). Only the looked-up rows then cross to the device, not the table:
        Llama-3-8B's is 1.05 GB, a sixth of what a 4-bit pass moves, for 8 rows.

        - A cache that holds it (cache=ram, pinned on CUDA): when the device is not the host.
        - A cache that rereads every pass (cache=disk): on any device, when no other unit reads its file (a tied
          lm_head needs the whole table). The file is mapped, not read (`LayerCache.lookup_table`): a pass reads
          the pages of its rows, not the table.
        """
        if name != LOOKUP_UNIT or name in self.resident or not self.codec.stores_plain(name):
            return False
        if self.cache.rereads:
            return self.cache.files.readers(name) == 1
        return self.device.type != "cpu"

    def stream(self, names: Sequence[str]) -> Iterator[DeviceLayer]:
        """Device-ready layers for one pass, in `names` order."""
        return self.prefetcher.stream(names, self._fetch, self._decode)

    def _fetch(self, name: str) -> DeviceLayer:
        """`name` on the device in its stored form: read by the cache, then copied (a table looked up on the
        host stays there). The copy is ours, not the codec's, so that transfer and decode are timed apart."""
        t0 = self.clock.host()
        with stage_range("load", name):
            layer = self._load(name)
        layer.load_issue_s += self.clock.host() - t0
        return layer

    def _load(self, name: str) -> DeviceLayer:
        if name in self.resident:
            # A new dict: the runner clears the weights it is handed, which must not empty the resident set.
            return DeviceLayer(name, dict(self.resident[name]))
        clock = self.clock
        read_before = self.cache.bytes_read
        r0 = clock.host()
        lookup = self.looks_up_on_host(name)
        stored = self.cache.lookup_table(name) if lookup else self.cache.get(name)
        r1 = clock.host()
        read = self.cache.bytes_read - read_before
        if lookup:
            # A new dict, as above: the cache keeps these tensors.
            return DeviceLayer(name, dict(stored), stamps={"read": (r0, r1)}, bytes={"read": read})
        h0 = clock.device()
        on_device = to_device(stored, self.device)
        h1 = clock.device()
        moved = sum(t.nbytes for t in stored.values() if t.device != self.device)
        stamps = {"read": (r0, r1), "h2d": (h0, h1)}
        return DeviceLayer(name, on_device, stamps=stamps, bytes={"read": read, "h2d": moved})

    def _decode(self, layer: DeviceLayer) -> DeviceLayer:
        """A fetched layer's weights, decoded on the device in place of its stored form."""
        if self.looks_up_on_host(layer.name):
            return layer
        t0 = self.clock.host()
        d0 = self.clock.device()
        with stage_range("decode", layer.name):
            layer.weights = dict(self.codec.decode(layer.name, layer.weights, self.device))
        layer.stamps["decode"] = (d0, self.clock.device())
        layer.bytes["decode"] = sum(t.nbytes for t in layer.weights.values())
        layer.load_issue_s += self.clock.host() - t0
        return layer
