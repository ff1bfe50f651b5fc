"""How fast each link a streamed layer crosses really is on this machine.

Every decode token moves each layer through the same chain: storage (or the page cache) ->
host memory -> the device -> the decoder (for compressed layers) -> compute. The rates are
measured here rather than taken from data sheets, because what matters is what this machine,
filesystem and driver deliver, not the hardware's nominal peak.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter

import torch

from harness.device import indexed_device
from strategies.cache.files import drop_page_cache, make_resident
from strategies.checks import check_positive
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig

logger = logging.getLogger(__name__)

# Big enough that per-call overhead is noise, small enough that the read buffer stays in cache.
_READ_CHUNK_BYTES = 16 << 20
# The decode benchmark's weight: one 4096x4096 projection, the size of an 8B model's q/o_proj.
_DEQUANT_SHAPE = (4096, 4096)
# The codecs' own defaults, so the dequant rates are those of what the codecs actually run.
CODEC_8BIT = Blockwise8bitConfig()
CODEC_4BIT = Blockwise4bitConfig()
# If a "cold" read comes within this factor of a warm one, the page-cache drop probably did nothing.
_COLD_LOOKS_WARM = 0.9


@dataclass
class LinkRates:
    """Measured rates in bytes per second; None where the link does not exist on this device."""

    disk_read_cold_bytes_per_s: float
    page_cache_bytes_per_s: float
    host_copy_bytes_per_s: float
    h2d_pinned_bytes_per_s: float | None
    h2d_pageable_bytes_per_s: float | None
    dequant_8bit_bytes_per_s: float | None  # decoded (output) bytes per second, on the device
    dequant_4bit_bytes_per_s: float | None
    device: str  # "cpu" / "cuda:0 (NVIDIA H100 ...)"
    measured_at: str  # ISO 8601, UTC

    def dequant_bytes_per_s(self, bits: int) -> float | None:
        """The decode rate of the blockwise codec that stores `bits` a weight."""
        return {8: self.dequant_8bit_bytes_per_s, 4: self.dequant_4bit_bytes_per_s}[bits]


# ---------------------------------------------------------------- timing


def best_seconds(prepare: Callable[[], Callable[[], object]], device: torch.device, repeats: int) -> float:
    """Best time of `prepare()()` over `repeats` runs, after one untimed warm-up run (`timed_seconds`).
    The best (not the mean) is kept: interference only ever adds time."""
    return min(timed_seconds(prepare, device, repeats))


def timed_seconds(prepare: Callable[[], Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """The times of `prepare()()` over `repeats` runs, after one untimed warm-up run.

    `prepare` does the untimed setup of one run and returns the work to time. On CUDA the work is
    bracketed by CUDA events on the device's current stream: host timers around asynchronous calls
    time the launch, not the work. Elsewhere the work is synchronous and perf_counter is exact.
    """
    check_positive("repeats", repeats)
    times = []
    for attempt in range(repeats + 1):
        run = prepare()
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.synchronize(device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3  # ms -> s
        else:
            t0 = perf_counter()
            run()
            elapsed = perf_counter() - t0
        if attempt > 0:  # the first run pays for lazy init, allocator growth and cold caches
            times.append(elapsed)
    return times


def _rate(nbytes: int, seconds: float) -> float:
    # A clock that cannot resolve the work would give an infinite rate: report it as a failure instead.
    if seconds <= 0:
        raise RuntimeError(f"{nbytes} bytes timed at {seconds} s: the clock cannot resolve this measurement")
    return nbytes / seconds


# ---------------------------------------------------------------- device naming


def describe_device(device: torch.device) -> str:
    device = indexed_device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def device_tag(device: torch.device) -> str:
    """A file-name-safe tag: the GPU's name is in it, because a reused host name may get another GPU."""
    device = indexed_device(device)
    tag = device.type + ("" if device.index is None else str(device.index))
    if device.type == "cuda":
        tag += "-" + torch.cuda.get_device_name(device)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


# ---------------------------------------------------------------- the links


def _write_scratch(path: Path, size_bytes: int) -> None:
    # Random bytes, not zeros: a compressing filesystem (btrfs, zfs) would read zeros implausibly fast.
    block = os.urandom(min(_READ_CHUNK_BYTES, size_bytes))
    with open(path, "wb", buffering=0) as f:
        left = size_bytes
        while left:
            left -= f.write(block[: min(len(block), left)])
        # Dirty pages cannot be dropped: fsync makes them clean, so the cold read's DONTNEED drops them all.
        os.fsync(f.fileno())


def _read_all(path: Path, buffer: memoryview) -> int:
    total = 0
    # Unbuffered, into one preallocated buffer: the time is the read, not Python buffering or allocation.
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def plain_read_rate(paths: Sequence[Path], cold: bool) -> float:
    """Bytes per second of a plain sequential read of `paths`, each dropped from the page cache first
    when `cold`: the yardstick for the read stage of a run over the same files."""
    buffer = memoryview(bytearray(_READ_CHUNK_BYTES))
    total, seconds = 0, 0.0
    for path in paths:
        if cold:
            drop_page_cache(path)
        start = perf_counter()
        total += _read_all(path, buffer)
        seconds += perf_counter() - start
    return _rate(total, seconds)


def kept_mapping_rate(paths: Sequence[Path], repeats: int = 2) -> float:
    """Bytes per second of a warm pass of the disk cache over `paths`: their kept mappings checked with
    mincore and populated where the OS evicted pages, no copy. With nothing evicted, a page-table scan: far
    faster than populating every page, or than a read() into a buffer, which copies."""
    total = sum(path.stat().st_size for path in paths)
    with contextlib.ExitStack() as stack:
        tensors: dict[str, torch.Tensor] = {}
        # Released before the mappings close: a tensor exports its mapping's buffer.
        stack.callback(tensors.clear)
        for index, path in enumerate(paths):
            f = stack.enter_context(open(path, "rb"))
            # ACCESS_COPY: a private mapping torch wraps without a read-only warning; reads share the page cache.
            mapped = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
            tensors[str(index)] = torch.frombuffer(mapped, dtype=torch.uint8)
        for name, tensor in tensors.items():
            make_resident({name: tensor})  # as the cache's first pass: the kept mappings' pages all mapped

        def one_pass() -> None:
            for name, tensor in tensors.items():  # one file at a time, as the cache does
                make_resident({name: tensor}, kept=True)

        seconds = best_seconds(lambda: one_pass, torch.device("cpu"), repeats)
    return _rate(total, seconds)


@contextlib.contextmanager
def _scratch_file(scratch_dir: Path, size_bytes: int) -> Iterator[Path]:
    """A `size_bytes` file of random bytes in `scratch_dir`, written and fsynced; deleted afterwards."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="probe-", suffix=".bin", dir=scratch_dir)
    os.close(fd)
    path = Path(name)
    try:
        _write_scratch(path, size_bytes)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _disk_rates(scratch_dir: Path, size_bytes: int, repeats: int) -> tuple[float, float]:
    with _scratch_file(scratch_dir, size_bytes) as path:
        buffer = memoryview(bytearray(min(_READ_CHUNK_BYTES, size_bytes)))
        cpu = torch.device("cpu")

        if not hasattr(os, "posix_fadvise"):
            logger.warning("no posix_fadvise here: the 'cold' disk read may be served from the page cache")

        def cold() -> Callable[[], object]:
            drop_page_cache(path)
            return lambda: _read_all(path, buffer)

        if _read_all(path, buffer) != size_bytes:
            raise RuntimeError(f"{path} reads back short of the {size_bytes} bytes written")
        cold_s = best_seconds(cold, cpu, repeats)
        warm = kept_mapping_rate([path], repeats)
    cold_rate, warm_rate = _rate(size_bytes, cold_s), warm
    if cold_rate >= _COLD_LOOKS_WARM * warm_rate:
        logger.warning(
            "cold disk read (%.2f GB/s) is close to the warm one (%.2f GB/s): on tmpfs, overlay or network "
            "filesystems the page-cache drop may have no effect, so 'cold' may not be the storage rate",
            cold_rate / 1e9,
            warm_rate / 1e9,
        )
    return cold_rate, warm_rate


def _host_copy_rate(size_bytes: int, repeats: int) -> float:
    src = torch.ones(size_bytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)  # written once so the timed copies do not pay first-touch page faults
    return _rate(size_bytes, best_seconds(lambda: lambda: dst.copy_(src), torch.device("cpu"), repeats))


def _h2d_rates(device: torch.device, size_bytes: int, repeats: int) -> tuple[float, float]:
    # Filled so every page is touched before timing; torch.empty is the factory documented to pin.
    pinned = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(size_bytes, dtype=torch.uint8)
    # .to(device, non_blocking=True) is what the codecs call; the warm-up leaves the block in the allocator's cache.
    pinned_s = best_seconds(lambda: lambda: pinned.to(device, non_blocking=True), device, repeats)
    pageable_s = best_seconds(lambda: lambda: pageable.to(device, non_blocking=True), device, repeats)
    return _rate(size_bytes, pinned_s), _rate(size_bytes, pageable_s)


def dequant_rates(device: torch.device, repeats: int, into_reused: bool = False) -> tuple[float, float]:
    """8-bit and 4-bit decoded bytes per second. The codecs allocate each decoded weight, so the allocation is
    part of the link; `into_reused`: decoded into one buffer instead (out=), what decoding into reused device
    buffers would gain (the GPU check asks)."""
    # Imported here: bitsandbytes takes seconds to import (and warns on CPU-only machines); the other links
    # and token_floor do not need it.
    import bitsandbytes.functional as bnbf

    weight = torch.randn(_DEQUANT_SHAPE, dtype=torch.bfloat16, device=device)
    decoded_bytes = weight.numel() * weight.element_size()
    codes8, state8 = bnbf.quantize_blockwise(weight, blocksize=CODEC_8BIT.blocksize)
    codes4, state4 = bnbf.quantize_4bit(weight, blocksize=CODEC_4BIT.blocksize, quant_type=CODEC_4BIT.quant_type)
    out = torch.empty_like(weight) if into_reused else None
    del weight
    s8 = best_seconds(lambda: lambda: bnbf.dequantize_blockwise(codes8, state8, out=out), device, repeats)
    s4 = best_seconds(lambda: lambda: bnbf.dequantize_4bit(codes4, state4, out=out), device, repeats)
    return _rate(decoded_bytes, s8), _rate(decoded_bytes, s4)


def direct_read_rate(scratch_dir: Path, size_bytes: int, repeats: int = 2) -> float | None:
    """A cold read of a `size_bytes` scratch file with O_DIRECT (no page cache, straight into page-aligned memory),
    in bytes per second, to hold against the probe's buffered cold read (`disk_read_cold_bytes_per_s`, the
    disk cache's way) of a file of the same size; None where O_DIRECT is refused (tmpfs, not Linux). The GPU
    check asks with it whether O_DIRECT would be the faster read."""
    if not hasattr(os, "O_DIRECT"):
        return None
    # Anonymous memory is page-aligned, as O_DIRECT requires of the buffer.
    with _scratch_file(scratch_dir, size_bytes) as path, mmap.mmap(-1, _READ_CHUNK_BYTES) as aligned:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:  # EINVAL: a filesystem without direct I/O
            return None
        buffer = memoryview(aligned)

        def read_direct() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                while os.readv(fd, [buffer]):
                    pass
            finally:
                os.close(fd)

        try:
            return _rate(size_bytes, best_seconds(lambda: read_direct, torch.device("cpu"), repeats))
        finally:
            buffer.release()  # the mapping closes only once nothing exports it


def measure_link_rates(
    device: torch.device, scratch_dir: Path, size_bytes: int = 256 << 20, repeats: int = 3
) -> LinkRates:
    """Measure every link once (best of `repeats` each). `scratch_dir` should be on the filesystem the
    layer files are read from; a `size_bytes` scratch file is written there and deleted."""
    check_positive("size_bytes", size_bytes)
    device = indexed_device(device)
    scratch_dir = Path(scratch_dir)
    logger.info("probing links on %s (%d MiB, best of %d)", describe_device(device), size_bytes >> 20, repeats)
    cold, warm = _disk_rates(scratch_dir, size_bytes, repeats)
    host = _host_copy_rate(size_bytes, repeats)
    h2d_pinned = h2d_pageable = None
    # Only CUDA has a separate memory to copy into that we can time; on CPU the "device" is host memory.
    if device.type == "cuda":
        h2d_pinned, h2d_pageable = _h2d_rates(device, size_bytes, repeats)
    dequant_8bit, dequant_4bit = dequant_rates(device, repeats)
    return LinkRates(
        disk_read_cold_bytes_per_s=cold,
        page_cache_bytes_per_s=warm,
        host_copy_bytes_per_s=host,
        h2d_pinned_bytes_per_s=h2d_pinned,
        h2d_pageable_bytes_per_s=h2d_pageable,
        dequant_8bit_bytes_per_s=dequant_8bit,
        dequant_4bit_bytes_per_s=dequant_4bit,
        device=describe_device(device),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
