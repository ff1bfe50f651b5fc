"""Reading a layer file into host memory, with the page-cache policy asked for."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file


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


def read_layer_file(path: Path, page_cache: str, pin: bool = False) -> dict[str, torch.Tensor]:
    """A layer file's tensors in host memory the process owns, read with the page-cache policy asked for.

    safetensors' load_file maps the file, so its disk reads would happen later, as page faults
    in whatever first touches the weights (the layer's compute, on CPU), and the read stage
    would time nothing. The copy reads every byte here, once (half the cost of reading into
    bytes and deserializing them): into pinned memory when `pin`, so pinning costs no second copy.
    """
    if page_cache == "cold":
        drop_page_cache(path)
    return {key: t.pin_memory() if pin else t.clone() for key, t in load_file(path).items()}
