"""Reading a layer file into host memory, with the page-cache policy asked for.

A layer file is mapped, not copied: safetensors' `load_file` returns tensors that are views of a
private mapping of the file, so on the CPU the layer computes straight from the OS page cache.
`make_resident` then brings every page in before the read stage ends, so the read is timed as
read and not as page faults in whatever touches the weights first (the compute, on the CPU).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)


# Python 3.11's mmap module names neither call below, and both apply to the mapping safetensors made,
# which only its tensors' addresses reveal: hence libc.
_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class MappedFileShrank(RuntimeError):
    """A mapped layer file ends before its mapping does: it was truncated or replaced while the run read it.
    Touching the missing pages would kill the process with a bus error (SIGBUS)."""


class _Populate:
    """madvise(MADV_POPULATE_READ) (Linux 5.14+): fault a mapping's pages in, reading them from storage
    where needed, without copying them anywhere."""

    ADVICE = 22

    def __init__(self) -> None:
        self.works = _LIBC is not None

    def __call__(self, start: int, length: int) -> bool:
        """True when the pages are in; False (and never tried again) where the kernel lacks the advice.
        Raises MappedFileShrank where a page lies past the file's end (the kernel's EFAULT for this advice)."""
        if not self.works:
            return False
        if _LIBC.madvise(start, length, self.ADVICE) == 0:
            return True
        if ctypes.get_errno() == errno.EFAULT:
            raise MappedFileShrank("the mapped file is shorter than its mapping")
        self.works = False  # an older kernel (EINVAL) or another libc: the caller touches the pages instead
        log.warning("madvise(MADV_POPULATE_READ) failed (%s): reading layer files by touching each page",
                    os.strerror(ctypes.get_errno()))
        return False


_populate = _Populate()


class _Mincore:
    """mincore(2): which pages of a mapping are in memory, one byte per page. Over a mapping whose pages
    are all mapped it only scans page tables, many times faster than MADV_POPULATE_READ walking the same
    pages to do nothing."""

    def all_in(self, start: int, length: int) -> bool | None:
        """True when every page of the range is in memory; None where this cannot be asked."""
        if _LIBC is None:
            return None
        pages = -(-length // mmap.PAGESIZE)
        # A vector per call: the main thread and the prefetch worker may both ask.
        vector = ctypes.create_string_buffer(pages)
        if _LIBC.mincore(start, length, vector) != 0:
            return None
        return 0 not in vector.raw


_mincore = _Mincore()


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages from the OS page cache, so the next read comes from storage.

    Only clean pages drop: files written once and fsynced (splits, the probe's scratch file) drop whole.
    """
    if not hasattr(os, "posix_fadvise"):  # not Linux: nothing to drop with; "cold" reads may be warm
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_resident(tensors: dict[str, torch.Tensor], kept: bool = False, path: Path | None = None) -> None:
    """Fault in every page of mapped host tensors now: from the page cache, or from storage when cold.

    kept: the mapping was made resident before (the disk cache's warm pass). Its pages stay mapped until
    the OS evicts them, so a page-table scan finds whether any must be read again, and only then are they.
    A fresh mapping is always populated: its pages may sit in the page cache yet be unmapped, and each
    would fault in the compute instead of being timed as read. `path`: the mapped file, named when it turns
    out shorter than its mapping.
    """
    if not tensors:
        return
    start = min(t.data_ptr() for t in tensors.values())
    end = max(t.data_ptr() + t.nbytes for t in tensors.values())
    start -= start % mmap.PAGESIZE
    if kept and _mincore.all_in(start, end - start):
        return
    try:
        if _populate(start, end - start):
            return
    except MappedFileShrank:
        size = path.stat().st_size if path is not None and path.exists() else None
        now = "is gone" if path is not None and size is None else f"is {size} bytes now"
        raise MappedFileShrank(
            f"{path or 'a layer file'} {now}, shorter than when the run mapped it: it was truncated or replaced "
            "while the run read it. Leave a split alone while a run reads it; the next run verifies it again "
            "(and re-splits a damaged one)",
        ) from None
    for t in tensors.values():
        if t.numel():
            # One byte per page: the fault reads the page; the sum only keeps the read from being skipped.
            t.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def read_layer_file(path: Path, cold: bool, pin: bool = False) -> dict[str, torch.Tensor]:
    """A layer file's tensors in host memory, read with the page-cache policy asked for.

    Not pinned: views of the file's mapping, every page resident (no copy; on the CPU the layer
    computes on them). Pinned (for CUDA's async copies): the file's data read straight into one
    page-locked buffer, its tensors views of it, so that the layer moves to the device in one copy.
    """
    if cold:  # from storage: the OS's cached pages dropped first
        drop_page_cache(path)
    if pin:
        layout = FileLayout.of(path)
        return read_packed(path, layout, torch.empty(layout.data_bytes, dtype=torch.uint8, pin_memory=True))
    tensors = load_file(path)
    make_resident(tensors, path=path)
    return tensors


# safetensors' dtype names (the format's own, stable) for the dtypes a split holds.
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class FileLayout:
    """Where a layer file's tensors lie: its data section (after the header) holds them back to back, in
    offset order, with no holes (safetensors requires both); each tensor's start is aligned to its dtype."""

    data_start: int
    data_bytes: int
    tensors: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # key, dtype, shape, offset in data

    @classmethod
    def of(cls, path: Path) -> FileLayout:
        tensors, offset = [], 0
        with safe_open(path, framework="pt") as f:
            for key in f.offset_keys():
                info = f.get_slice(key)
                dtype, shape = _DTYPES[info.get_dtype()], tuple(info.get_shape())
                tensors.append((key, dtype, shape, offset))
                offset += math.prod(shape) * dtype.itemsize
        return cls(os.path.getsize(path) - offset, offset, tuple(tensors))

    def views(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors, as views of `data` (uint8, the data section's bytes from its start)."""
        return {
            key: data[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for key, dtype, shape, offset in self.tensors
        }


def read_packed(path: Path, layout: FileLayout, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read a layer file's data section straight into `out` (uint8, at least `layout.data_bytes`; pinned for
    CUDA's async copies) and return its tensors as views of `out`: one buffer, one read, one copy to the
    device. Read with readinto, not mapped: the bytes go from the page cache (or storage) to `out` once."""
    view = memoryview(out.numpy()).cast("B")[: layout.data_bytes]
    with open(path, "rb", buffering=0) as f:
        f.seek(layout.data_start)
        done = 0
        while done < layout.data_bytes:
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(f"{path} ended {layout.data_bytes - done} bytes early: the split is damaged")
            done += n
    return layout.views(out)


def map_unread(path: Path, layout: FileLayout) -> dict[str, torch.Tensor]:
    """A layer file's tensors as views of a private mapping of it that reads nothing ahead: each page is read
    when first touched, and only it. For a table of which a pass reads a few rows."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, as torch wants; never written
    # Without it the kernel reads ahead around each fault (megabytes, by kernel and filesystem), so a lookup of a few
    # rows would read much of a cold table, as safetensors' own mapping (load_file) does; with it, only their pages.
    if hasattr(mmap, "MADV_RANDOM"):  # not on Windows
        mapping.madvise(mmap.MADV_RANDOM)
    # The tensor keeps the mapping alive; the file may close.
    return layout.views(torch.frombuffer(mapping, dtype=torch.uint8, offset=layout.data_start, count=layout.data_bytes))


class PinnedRing:
    """Reusable page-locked staging buffers for layer files read on every pass (cache=disk on CUDA).

    A slot may be refilled only once the host-to-device copy from it has finished. That copy is issued by
    the thread that asked for the slot, on its current stream, before it asks for the next one (the
    pipeline reads, then copies, one unit at a time): so each request records an event on the current stream
    for the slot handed out before it, and waits for the event of the slot it hands out now. Two slots let
    a read overlap the copy before it; more would only wait longer. A slot grows to the largest file it
    receives (one pass in, the ring stops allocating).
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._copied: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0
        self._last: int | None = None

    def slot(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` that no copy still reads from."""
        if self._last is not None and self.pin:
            event = self._copied[self._last] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        index, self._next = self._next, (self._next + 1) % len(self._buffers)
        if (event := self._copied[index]) is not None:
            event.synchronize()
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < nbytes:
            self._buffers[index] = buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._last = index
        return buffer

    @property
    def bytes_held(self) -> int:
        return sum(b.numel() for b in self._buffers if b is not None)
