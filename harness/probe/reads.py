"""What the run's own cache takes to read one file of a given size from a cold page cache.

The link probe's cold rate is the best plain read of a 256 MiB scratch file: a bound for the floor. A cold pass
reads the head's file the cache's way instead (dropped from the page cache, mapped afresh and every page faulted
in; on CUDA read into a page-locked slot), at the file's own size, and pays a typical read, not the best one.
The plan prices the head's fetch with this probe, since the stream probe's truncated models cut the vocabulary.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.probe.links import timed_seconds
from harness.probe.stream import ProbeFiles, remove_orphans
from strategies.checks import check_positive

if TYPE_CHECKING:
    from strategies.cache.configs import CacheConfig

# The scratch file's random bytes are written in blocks of this size, one block repeated.
_BLOCK_BYTES = 16 << 20
# The scratch folders' prefix: `remove_orphans` removes those of processes killed before removing theirs.
SCRATCH_PREFIX = "read"


def _write_file(path: Path, size_bytes: int) -> None:
    """A safetensors file of about `size_bytes` (one uint8 tensor, random bytes, so a compressing filesystem
    cannot shrink it), fsynced so that dropping it from the page cache drops every page."""
    from safetensors.torch import save_file

    data = torch.empty(max(1, size_bytes - 128), dtype=torch.uint8)  # 128: about the header's bytes
    block = torch.randint(0, 256, (min(_BLOCK_BYTES, data.numel()),), dtype=torch.uint8)
    for start in range(0, data.numel(), block.numel()):
        chunk = data[start : start + block.numel()]
        chunk.copy_(block[: chunk.numel()])
    save_file({"data": data}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure_cold_read_s(
    cache: CacheConfig, device: torch.device, size_bytes: int, scratch_dir: Path, repeats: int = 5
) -> float:
    """The median seconds of `repeats` reads of a `size_bytes` file by the cache `cache` configures, on `device`,
    each from a cold page cache, after one untimed read. The file is written in a folder of `scratch_dir` and
    removed afterwards."""
    check_positive("size_bytes", size_bytes)
    check_positive("repeats", repeats)
    if not cache.cold:
        raise ValueError(f"a cold read needs cache.page_cache=cold, not {cache.page_cache!r}")
    if not cache.rereads:
        raise ValueError(f"cache={cache.name} reads each file once, not at every pass: it has no per-pass read to time")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(scratch_dir, SCRATCH_PREFIX)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}-{os.getpid()}-", dir=scratch_dir) as folder:
        path = Path(folder) / "file.safetensors"
        _write_file(path, size_bytes)
        seconds = _timed_reads(cache, path, device, repeats)  # its mappings and slots go before the folder does
    return statistics.median(seconds)


def _timed_reads(cache: CacheConfig, path: Path, device: torch.device, repeats: int) -> list[float]:
    """Seconds of `repeats` reads of `path` by the cache `cache` configures, after an untimed one (the first mapping,
    the pinned slot's allocation). A read is host work whatever the device (on CUDA, into a pinned slot), so the
    host's clock times it."""
    import strategies

    reader = strategies.build(cache, files=ProbeFiles({"head": path}), device=device)
    return timed_seconds(lambda: lambda: reader.get("head"), torch.device("cpu"), repeats)
