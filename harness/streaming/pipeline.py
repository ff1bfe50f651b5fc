"""The strategy pipeline: cache -> host-to-device copy -> compression decode -> prefetch.

This is the only place the strategy families meet; each knows nothing of the others,
and the runner knows nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from harness.measurement.profile import stage_range
from harness.measurement.timeline import StageClock
from strategies.cache.base import LayerCache, LayerFiles
from strategies.cache.files import read_layer_file
from strategies.compression.base import Codec
from strategies.layer import DeviceLayer
from strategies.prefetch.base import Prefetcher

# Every dtype a layer file holds fits a multiple of this: a copy's length is rounded up to it, so that the copy can be
# viewed as any of them.
WIDEST_DTYPE_BYTES = 8


@dataclass(frozen=True)
class PackedLayout:
    """Where a packed layer's tensors lie in the bytes they cover (their span): found once per unit, then each pass
    copies the span in one transfer and views the copy in one op a tensor.

    Per pass that is 42 aten ops for a 4-bit layer's 30 tensors instead of 125 with a slice and views per tensor,
    on the prefetch worker, whose Python shares the GIL with the compute's: a few times less host time a layer.
    """

    nbytes: int  # the span's length
    first_start: int  # where the first tensor starts in the span
    dtypes: tuple[torch.dtype, ...]
    # Per tensor: key, dtype, offset (in elements of its dtype), shape, stride.
    views: tuple[tuple[str, torch.dtype, int, tuple[int, ...], tuple[int, ...]], ...]

    @classmethod
    def of(cls, stored: dict[str, torch.Tensor]) -> PackedLayout | None:
        """The layout of `stored` when its tensors are contiguous views of one buffer (a packed layer file:
        `read_packed`), each aligned to its dtype within their span; else None."""
        tensors = list(stored.values())
        if not tensors:
            return None
        storage = tensors[0].untyped_storage().data_ptr()
        starts = [t.storage_offset() * t.element_size() for t in tensors]
        lo = min(starts)
        if not all(
            t.untyped_storage().data_ptr() == storage
            and t.is_contiguous()
            and (start - lo) % t.element_size() == 0  # each view stays aligned to its dtype in a copy of the span
            for t, start in zip(tensors, starts, strict=True)
        ):
            return None
        hi = max(start + t.nbytes for t, start in zip(tensors, starts, strict=True))
        views = tuple(
            (key, t.dtype, (start - lo) // t.element_size(), tuple(t.shape), t.stride())
            for (key, t), start in zip(stored.items(), starts, strict=True)
        )
        return cls(hi - lo, starts[0] - lo, tuple(dict.fromkeys(t.dtype for t in tensors)), views)

    def fits(self, stored: dict[str, torch.Tensor]) -> bool:
        """Whether `stored`, a later read of the same unit, is laid out alike: its keys, in order, and its last tensor
        where the layout puts it from the first, in the same buffer (checking every tensor would cost what the
        layout saves)."""
        if len(stored) != len(self.views) or any(key != view[0] for key, view in zip(stored, self.views, strict=True)):
            return False
        tensors = list(stored.values())
        first, last = tensors[0], tensors[-1]
        _, dtype, offset, _, _ = self.views[-1]
        last_start = offset * dtype.itemsize
        return (
            last.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and last.dtype == dtype
            and last.storage_offset() * last.element_size() - first.storage_offset() * first.element_size()
            == last_start - self.first_start
        )

    def span(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bytes (uint8) `stored`'s tensors cover, found from the first one's place in its buffer."""
        first = next(iter(stored.values()))
        lo = first.storage_offset() * first.element_size() - self.first_start
        return torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage())[lo : lo + self.nbytes]

    def copy_size(self) -> int:
        """Bytes to allocate for a copy of the span: its length, rounded up so the copy views as every dtype."""
        return -(-self.nbytes // WIDEST_DTYPE_BYTES) * WIDEST_DTYPE_BYTES

    def views_of(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors as views of `buffer`, a uint8 copy of the span `copy_size()` long."""
        # as_strided counts its offset from the storage's start, not the view's: where `buffer` starts is added.
        typed = {}
        for dtype in self.dtypes:
            view = buffer.view(dtype)
            typed[dtype] = (view, view.storage_offset())
        return {
            key: typed[dtype][0].as_strided(shape, stride, typed[dtype][1] + offset)
            for key, dtype, offset, shape, stride in self.views
        }


def to_device(
    stored: dict[str, torch.Tensor],
    device: torch.device,
    layout_of: Callable[[dict[str, torch.Tensor]], PackedLayout | None] = PackedLayout.of,
) -> dict[str, torch.Tensor]:
    """A unit's host tensors on `device`, asynchronously where the host memory is pinned.

    A packed layer (one whose `layout_of` is a `PackedLayout`) moves in one copy and comes back as views of one
    device buffer: one transfer per layer instead of one per tensor (a 4-bit layer has 30). Already on `device`
    (the CPU computing on mapped files): as is, its layout never looked for.
    """
    if all(t.device == device for t in stored.values()):
        return dict(stored)
    return copy_to(stored, device, layout_of(stored))


def copy_to(
    stored: dict[str, torch.Tensor], device: torch.device, layout: PackedLayout | None
) -> dict[str, torch.Tensor]:
    """`to_device`'s copy, made even where the tensors already are on `device` (a CPU test of the CUDA path)."""
    if layout is None:
        return {key: t.to(device, non_blocking=True, copy=True) for key, t in stored.items()}
    on_device = torch.empty(layout.copy_size(), dtype=torch.uint8, device=device)
    on_device[: layout.nbytes].copy_(layout.span(stored), non_blocking=True)
    return layout.views_of(on_device)


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
        # Per unit, found at its first copy: where its packed tensors lie (None: not packed).
        self._layouts: dict[str, PackedLayout | None] = {}

    def keep_resident(self, files: LayerFiles, names: Sequence[str], decode_with: Codec | None = None) -> int:
        """Load `names` onto the device once, as stored (decoded each pass, like a streamed unit), or decoded
        once by `decode_with` (the pipeline's own codec then being `none`); the bytes kept.

        Read straight from the split, past the cache: a resident unit is never the cache's to hold.
        """
        by_file: dict[object, dict[str, torch.Tensor]] = {}
        for name in names:
            path = files.file(name)
            if path not in by_file:  # tied embed and lm_head share a file, and so one copy
                stored = read_layer_file(path, cold=False)
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
        on_device = to_device(stored, self.device, partial(self._layout, name))
        h1 = clock.device()
        moved = sum(t.nbytes for t in stored.values() if t.device != self.device)
        stamps = {"read": (r0, r1), "h2d": (h0, h1)}
        return DeviceLayer(name, on_device, stamps=stamps, bytes={"read": read, "h2d": moved})

    def _layout(self, name: str, stored: dict[str, torch.Tensor]) -> PackedLayout | None:
        """`name`'s packed layout (None: not packed), found at its first copy, and again for a read it does not fit."""
        if name in self._layouts:
            layout = self._layouts[name]
            if layout is None or layout.fits(stored):
                return layout
        layout = self._layouts[name] = PackedLayout.of(stored)
        return layout

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
