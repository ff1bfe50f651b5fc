"""cache: where a layer's stored tensors come from on each pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import MISSING
from safetensors.torch import load

from harness.checks import check_choice

PAGE_CACHE_STATES = ("warm", "cold")


@dataclass
class CacheConfig:
    name: str = MISSING
    _target_: str = MISSING
    # cold: drop the file's pages from the OS page cache before each read, so "from disk"
    # really is from disk (the seed's numbers were); warm: whatever the OS kept.
    page_cache: str = "warm"

    def __post_init__(self) -> None:
        check_choice("cache.page_cache", self.page_cache, PAGE_CACHE_STATES)


def read_layer_file(path: Path, page_cache: str) -> dict[str, torch.Tensor]:
    """A layer file's tensors in host memory, read with the page-cache policy asked for.

    The bytes are read here, not mapped: safetensors' load_file maps the file, so the disk
    reads would happen later as page faults inside whatever first touches the weights
    (the layer's compute on CPU) and the read stage would time nothing.
    """
    with open(path, "rb") as f:
        if page_cache == "cold":
            # Clean pages only: split files are written once and fsynced, so all of them drop.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = f.read()
    return load(data)


class LayerCache(Protocol):
    """Host tensors of one layer file, exactly as the split stored them (still encoded)."""

    def get(self, name: str) -> dict[str, torch.Tensor]: ...

    @property
    def bytes_held(self) -> int:
        """Host bytes this cache keeps alive between passes."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage so far (a running total: the pipeline takes differences)."""
        ...
