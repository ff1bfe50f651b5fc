"""cache=disk: read the layer file at every pass, keep no copy of it (AirLLM's default).

With a warm page cache the OS page cache is the cache: each file stays mapped, and every pass
faults in again whatever pages the OS evicted since the last one (that is the pass's read). With
a cold page cache each pass maps the file afresh after dropping it, so the read comes from storage.

On CUDA nothing is mapped: each file's data is read straight into a reused page-locked staging slot
(`PinnedRing`), from which the layer goes to the device in one asynchronous copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from strategies.cache.base import LayerFiles
from strategies.cache.configs import DiskCacheConfig
from strategies.cache.files import (
    FileLayout,
    PinnedRing,
    drop_page_cache,
    make_resident,
    map_unread,
    read_layer_file,
    read_packed,
)


class DiskCache:
    rereads = True

    def __init__(self, cfg: DiskCacheConfig, files: LayerFiles, device: torch.device) -> None:
        self.cfg = cfg
        self.files = files
        self.bytes_read = 0
        # A file that several units of a pass read (tied embed and lm_head): held from its first reader
        # to its last, so a pass reads it once. Path -> (tensors, readers still to come).
        self._shared: dict[Path, tuple[dict[str, torch.Tensor], int]] = {}
        self._mapped: dict[Path, dict[str, torch.Tensor]] = {}  # page_cache=warm: one mapping per file
        self.device = device
        self._ring = PinnedRing(2, device) if device.type == "cuda" else None
        # A file several units read stays in its own slot until its last reader's copy (the ring moves on).
        self._own_slot: dict[Path, PinnedRing] = {}
        self._layouts: dict[Path, FileLayout] = {}

    def get(self, name: str) -> dict[str, torch.Tensor]:
        path = self.files.file(name)
        if path in self._shared:
            tensors, left = self._shared.pop(path)
            if left > 1:
                self._shared[path] = (tensors, left - 1)
            return tensors
        self.bytes_read += self.files.file_bytes(name)
        readers = self.files.readers(name)
        tensors = self._read(path, readers)
        if readers > 1:
            self._shared[path] = (tensors, readers - 1)
        return tensors

    def lookup_table(self, name: str) -> dict[str, torch.Tensor]:
        """The file mapped, not read: the lookup faults in the pages of its rows alone (Llama-3-8B: a row is 8 KB
        of a 1.05 GB table), which `bytes_read` leaves out. Cold: dropped and mapped afresh, as a read
        would be; warm: the mapping kept for it."""
        path = self.files.file(name)
        layout = self._layout(path)
        if self.cfg.cold:
            drop_page_cache(path)
            return map_unread(path, layout)
        tensors = self._mapped.get(path)
        if tensors is None:
            tensors = self._mapped[path] = map_unread(path, layout)
        return tensors

    def _layout(self, path: Path) -> FileLayout:
        """Where the file's tensors lie, read from its header once per run."""
        if path not in self._layouts:
            self._layouts[path] = FileLayout.of(path)
        return self._layouts[path]

    def _read_staged(self, path: Path, readers: int) -> dict[str, torch.Tensor]:
        if self.cfg.cold:
            drop_page_cache(path)
        layout = self._layout(path)
        ring = self._ring if readers == 1 else self._own_slot.setdefault(path, PinnedRing(1, self.device))
        return read_packed(path, layout, ring.slot(layout.data_bytes))

    def _read(self, path: Path, readers: int) -> dict[str, torch.Tensor]:
        if self._ring is not None:
            return self._read_staged(path, readers)
        if self.cfg.cold:
            # Mapped afresh: a mapping kept from the last pass would keep its pages from being dropped.
            return read_layer_file(path, cold=True)
        tensors = self._mapped.get(path)
        if tensors is None:
            tensors = self._mapped[path] = read_layer_file(path, cold=False)
        else:
            make_resident(tensors, kept=True, path=path)
        return tensors

    @property
    def bytes_held(self) -> int:
        """Host bytes kept between passes: on CUDA the staging slots; else none of the process's own (mapped
        file pages are the OS's to evict)."""
        rings = [self._ring, *self._own_slot.values()] if self._ring is not None else []
        return sum(ring.bytes_held for ring in rings)
