"""Reading a layer file into host memory, with the page-cache policy asked for.

A layer file is mapped, not copied: safetensors' `load_file` returns tensors that are views of a
private mapping of the file, so on the CPU the layer computes straight from the OS page cache.
`make_resident` then brings every page in before the read stage ends, so the read is timed as
read and not as page faults in whatever touches the weights first (the compute, on the CPU).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)


class _Populate:
    """madvise(MADV_POPULATE_READ) (Linux 5.14+): fault a mapping's pages in, reading them from storage
    where needed, without copying them anywhere. Python 3.11's mmap module does not name it, and it can
    only apply to the mapping safetensors made, which only its tensors' addresses reveal: hence libc."""

    ADVICE = 22

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
        if self.libc is not None:
            self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.works = self.libc is not None

    def __call__(self, start: int, length: int) -> bool:
        """True when the pages are in; False (and never tried again) where the kernel lacks the advice."""
        if not self.works:
            return False
        if self.libc.madvise(start, length, self.ADVICE) == 0:
            return True
        self.works = False  # an older kernel (EINVAL) or another libc: the caller touches the pages instead
        log.warning("madvise(MADV_POPULATE_READ) failed (%s): reading layer files by touching each page",
                    os.strerror(ctypes.get_errno()))
        return False


_populate = _Populate()


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


def make_resident(tensors: dict[str, torch.Tensor]) -> None:
    """Fault in every page of mapped host tensors now: from the page cache, or from storage when cold."""
    if not tensors:
        return
    start = min(t.data_ptr() for t in tensors.values())
    end = max(t.data_ptr() + t.nbytes for t in tensors.values())
    start -= start % mmap.PAGESIZE
    if _populate(start, end - start):
        return
    for t in tensors.values():
        if t.numel():
            # One byte per page: the fault reads the page; the sum only keeps the read from being skipped.
            t.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def read_layer_file(path: Path, page_cache: str, pin: bool = False) -> dict[str, torch.Tensor]:
    """A layer file's tensors in host memory, read with the page-cache policy asked for.

    Not pinned: views of the file's mapping, every page resident (no copy; on the CPU the layer
    computes on them). Pinned (for CUDA's async copies): one copy straight from the mapping into
    page-locked memory.
    """
    if page_cache == "cold":
        drop_page_cache(path)
    tensors = load_file(path)
    if pin:
        return {key: t.pin_memory() for key, t in tensors.items()}
    make_resident(tensors)
    return tensors
