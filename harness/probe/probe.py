"""The link probe: how fast each link a streamed layer crosses really is on this machine, and the
per-token floor those rates imply.

Every decode token moves each layer through the same chain: storage (or the page cache) ->
host memory -> the device -> the decoder (for compressed layers) -> compute. With the links
able to overlap (prefetch), one token can never take less than the slowest link's time for
its bytes: that is the floor `token_floor` computes. The rates are measured here rather than
taken from data sheets, because what matters is what this machine, filesystem and driver
deliver, not the hardware's nominal peak.

Measurements are cached per machine and device (`load_or_measure`): they take seconds to
tens of seconds and do not change between runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter

import torch
from transformers import LlamaConfig

from harness.device import resolve_device
from strategies.cache.configs import PAGE_CACHE_STATES
from strategies.checks import check_choice, check_positive

logger = logging.getLogger(__name__)

# Big enough that per-call overhead is noise, small enough that the read buffer stays in cache.
_READ_CHUNK_BYTES = 16 << 20
# The decode benchmark's weight: one 4096x4096 projection, the size of an 8B model's q/o_proj.
_DEQUANT_SHAPE = (4096, 4096)
_BLOCKSIZE_8BIT = 256  # strategies.compression.blockwise_8bit's default
_BLOCKSIZE_4BIT = 64  # strategies.compression.blockwise_4bit's default (nf4)
# Decode step against this many cached positions, so attention reads a KV cache as it does in generation.
_PREFILLED_POSITIONS = 8
# If a "cold" read comes within this factor of a warm one, the page-cache drop probably did nothing.
_COLD_LOOKS_WARM = 0.9

LINKS = ("disk", "host_copy", "h2d", "dequant", "compute")
DEQUANT_CODECS = ("8bit", "4bit")


@dataclass
class LinkRates:
    """Measured rates in bytes per second; None where the link does not exist on this device."""

    disk_read_cold_bytes_per_s: float
    disk_read_warm_bytes_per_s: float
    host_copy_bytes_per_s: float
    h2d_pinned_bytes_per_s: float | None
    h2d_pageable_bytes_per_s: float | None
    dequant_8bit_bytes_per_s: float | None  # decoded (output) bytes per second, on the device
    dequant_4bit_bytes_per_s: float | None
    device: str  # "cpu" / "cuda:0 (NVIDIA H100 ...)"
    measured_at: str  # ISO 8601, UTC


@dataclass
class Floor:
    floor_s: float  # the slowest link's time for one token
    limiting: str  # which link: one of LINKS
    per_link_s: dict[str, float]


# ---------------------------------------------------------------- timing


def _best_seconds(prepare: Callable[[], Callable[[], object]], device: torch.device, repeats: int) -> float:
    """Best time of `prepare()()` over `repeats` runs, after one untimed warm-up run.

    `prepare` does the untimed setup of one run and returns the work to time. On CUDA the work is
    bracketed by CUDA events on the device's current stream: host timers around asynchronous calls
    time the launch, not the work. Elsewhere the work is synchronous and perf_counter is exact.
    The best (not the mean) is kept: interference only ever adds time.
    """
    check_positive("repeats", repeats)
    best = math.inf
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
            best = min(best, elapsed)
    return best


def _rate(nbytes: int, seconds: float) -> float:
    # A clock that cannot resolve the work would give an infinite rate: report it as a failure instead.
    if seconds <= 0:
        raise RuntimeError(f"{nbytes} bytes timed at {seconds} s: the clock cannot resolve this measurement")
    return nbytes / seconds


# ---------------------------------------------------------------- device naming


def _resolved(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current index>`, so names and cache files say which GPU was measured."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def describe_device(device: torch.device) -> str:
    device = _resolved(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _device_tag(device: torch.device) -> str:
    """A file-name-safe tag: the GPU's name is in it, because a reused host name may get another GPU."""
    device = _resolved(device)
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


def _drop_page_cache(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path: Path, buffer: memoryview) -> int:
    total = 0
    # Unbuffered, into one preallocated buffer: the time is the read, not Python buffering or allocation.
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def _disk_rates(scratch_dir: Path, size_bytes: int, repeats: int) -> tuple[float, float]:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="probe-", suffix=".bin", dir=scratch_dir)
    os.close(fd)
    path = Path(name)
    try:
        _write_scratch(path, size_bytes)
        buffer = memoryview(bytearray(min(_READ_CHUNK_BYTES, size_bytes)))
        cpu = torch.device("cpu")

        if not hasattr(os, "posix_fadvise"):
            logger.warning("no posix_fadvise here: the 'cold' disk read may be served from the page cache")

        def cold() -> Callable[[], object]:
            _drop_page_cache(path)
            return lambda: _read_all(path, buffer)

        if _read_all(path, buffer) != size_bytes:
            raise RuntimeError(f"{path} reads back short of the {size_bytes} bytes written")
        cold_s = _best_seconds(cold, cpu, repeats)
        warm_s = _best_seconds(lambda: lambda: _read_all(path, buffer), cpu, repeats)
    finally:
        path.unlink(missing_ok=True)
    cold_rate, warm_rate = _rate(size_bytes, cold_s), _rate(size_bytes, warm_s)
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
    return _rate(size_bytes, _best_seconds(lambda: lambda: dst.copy_(src), torch.device("cpu"), repeats))


def _h2d_rates(device: torch.device, size_bytes: int, repeats: int) -> tuple[float, float]:
    # Filled so every page is touched before timing; torch.empty is the factory documented to pin.
    pinned = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(size_bytes, dtype=torch.uint8)
    # .to(device, non_blocking=True) is what the codecs call; the warm-up leaves the block in the allocator's cache.
    pinned_s = _best_seconds(lambda: lambda: pinned.to(device, non_blocking=True), device, repeats)
    pageable_s = _best_seconds(lambda: lambda: pageable.to(device, non_blocking=True), device, repeats)
    return _rate(size_bytes, pinned_s), _rate(size_bytes, pageable_s)


def _dequant_rates(device: torch.device, repeats: int) -> tuple[float, float]:
    # Imported here: bitsandbytes takes seconds to import (and warns on CPU-only machines); the other links
    # and token_floor do not need it.
    import bitsandbytes.functional as bnbf

    weight = torch.randn(_DEQUANT_SHAPE, dtype=torch.bfloat16, device=device)
    decoded_bytes = weight.numel() * weight.element_size()
    codes8, state8 = bnbf.quantize_blockwise(weight, blocksize=_BLOCKSIZE_8BIT)
    codes4, state4 = bnbf.quantize_4bit(weight, blocksize=_BLOCKSIZE_4BIT, quant_type="nf4")
    del weight
    # Without out=: the codecs allocate the decoded weight too, so the allocation is part of the link.
    s8 = _best_seconds(lambda: lambda: bnbf.dequantize_blockwise(codes8, state8), device, repeats)
    s4 = _best_seconds(lambda: lambda: bnbf.dequantize_4bit(codes4, state4), device, repeats)
    return _rate(decoded_bytes, s8), _rate(decoded_bytes, s4)


def measure_link_rates(
    device: torch.device, scratch_dir: Path, size_bytes: int = 256 << 20, repeats: int = 3
) -> LinkRates:
    """Measure every link once (best of `repeats` each). `scratch_dir` should be on the filesystem the
    layer files are read from; a `size_bytes` scratch file is written there and deleted."""
    check_positive("size_bytes", size_bytes)
    device = _resolved(device)
    scratch_dir = Path(scratch_dir)
    logger.info("probing links on %s (%d MiB, best of %d)", describe_device(device), size_bytes >> 20, repeats)
    cold, warm = _disk_rates(scratch_dir, size_bytes, repeats)
    host = _host_copy_rate(size_bytes, repeats)
    h2d_pinned = h2d_pageable = None
    # Only CUDA has a separate memory to copy into that we can time; on CPU the "device" is host memory.
    if device.type == "cuda":
        h2d_pinned, h2d_pageable = _h2d_rates(device, size_bytes, repeats)
    dequant_8bit, dequant_4bit = _dequant_rates(device, repeats)
    return LinkRates(
        disk_read_cold_bytes_per_s=cold,
        disk_read_warm_bytes_per_s=warm,
        host_copy_bytes_per_s=host,
        h2d_pinned_bytes_per_s=h2d_pinned,
        h2d_pageable_bytes_per_s=h2d_pageable,
        dequant_8bit_bytes_per_s=dequant_8bit,
        dequant_4bit_bytes_per_s=dequant_4bit,
        device=describe_device(device),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------- the cache


_OPTIONAL_RATES = {
    "h2d_pinned_bytes_per_s",
    "h2d_pageable_bytes_per_s",
    "dequant_8bit_bytes_per_s",
    "dequant_4bit_bytes_per_s",
}


def _rates_from_json(data: object) -> LinkRates:
    """A LinkRates from its JSON form; ValueError on anything else, so a damaged file is re-measured."""
    names = {f.name for f in fields(LinkRates)}
    if not isinstance(data, dict) or set(data) != names:
        raise ValueError(f"expected an object with exactly the keys {sorted(names)}")
    for key, value in data.items():
        if key in ("device", "measured_at"):
            ok = isinstance(value, str)
        elif value is None:
            ok = key in _OPTIONAL_RATES
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok:
            raise ValueError(f"{key}={value!r} is not a valid value")
    return LinkRates(**data)


def cache_path(device: torch.device, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{socket.gethostname()}-{_device_tag(device)}.json"


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a half file that a later run would have to reject.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_measure(
    device: torch.device,
    cache_dir: Path,
    scratch_dir: Path,
    refresh: bool = False,
    *,
    size_bytes: int = 256 << 20,
    repeats: int = 3,
) -> LinkRates:
    """The cached rates for this host and device, measuring (and caching) them when there are none,
    when the cached file cannot be read or is for another device, or when `refresh` is set."""
    path = cache_path(device, cache_dir)
    if not refresh and path.exists():
        try:
            rates = _rates_from_json(json.loads(path.read_text(encoding="utf-8")))
            if rates.device != describe_device(device):
                raise ValueError(f"measured on {rates.device}, not {describe_device(device)}")
            logger.info("link rates from %s (measured %s)", path, rates.measured_at)
            return rates
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            logger.warning("re-measuring: cached link rates %s are unusable (%s)", path, exc)
    rates = measure_link_rates(device, scratch_dir, size_bytes=size_bytes, repeats=repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(asdict(rates), indent=2) + "\n")
    logger.info("link rates cached in %s", path)
    return rates


# ---------------------------------------------------------------- compute


def measure_layer_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, seq_len: int = 1, repeats: int = 5
) -> float:
    """Seconds for ONE decoder layer's forward in a decode step (best of `repeats`, after a warm-up):
    a real transformers LlamaDecoderLayer with random weights, `seq_len` new positions against a
    DynamicCache already holding a few. Multiply by the layer count for a token's decoder compute
    (embedding, final norm and lm_head are not in it)."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    check_positive("seq_len", seq_len)
    device = _resolved(device)
    config = copy.deepcopy(config)  # the caller's config keeps its own attention implementation
    config._attn_implementation = "sdpa"  # what the runner and the reference use
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # Built on meta and materialized on the device: no fp32 host init of ~218M parameters for the 8B
    # geometry. Filled explicitly because uninitialized memory may hold NaNs or denormals, which can
    # make CPU matmuls many times slower than real weights.
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    layer = layer.to(dtype=dtype).to_empty(device=device).eval()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range)
    rotary = LlamaRotaryEmbedding(config).to(device)

    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, seq_len, config.hidden_size, dtype=dtype, device=device, generator=generator)
    past_kv_shape = (1, config.num_key_value_heads, _PREFILLED_POSITIONS, head_dim)
    past_k = torch.randn(past_kv_shape, dtype=dtype, device=device, generator=generator)
    past_v = torch.randn(past_kv_shape, dtype=dtype, device=device, generator=generator)
    position_ids = torch.arange(_PREFILLED_POSITIONS, _PREFILLED_POSITIONS + seq_len, device=device).unsqueeze(0)
    position_embeddings = rotary(hidden, position_ids)  # once per pass in the runner, not per layer: untimed

    def prepare() -> Callable[[], object]:
        # A fresh cache per run: each forward appends to it, and every run should see the same past length.
        cache = DynamicCache()
        cache.update(past_k, past_v, layer_idx=0)
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=position_ids
        )
        return lambda: layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )

    with torch.inference_mode():
        return _best_seconds(prepare, device, repeats)


def load_or_measure_layer_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path, seq_len: int = 1,
    refresh: bool = False,
) -> float:
    """`measure_layer_compute_s`, cached beside the link rates per host, device, geometry, dtype and seq_len.

    Measured once, the floor stays put between runs; re-measured in every run, it moved by about 15%
    on a shared CPU, and that noise went straight into every floor ratio.
    """
    geometry = {
        key: getattr(config, key)
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    }
    key = {**geometry, "dtype": str(dtype).removeprefix("torch."), "seq_len": seq_len}
    tag = "-".join(str(v) for v in key.values())
    path = Path(cache_dir) / f"{socket.gethostname()}-{_device_tag(device)}-layer-{tag}.json"
    if not refresh and path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key and cached.get("layer_compute_s", 0) > 0:
                return float(cached["layer_compute_s"])
        except (OSError, ValueError) as exc:
            logger.warning("re-measuring: cached layer compute %s is unusable (%s)", path, exc)
    seconds = measure_layer_compute_s(config, device, dtype, seq_len=seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps({"key": key, "layer_compute_s": seconds}, indent=2) + "\n")
    return seconds


# ---------------------------------------------------------------- the floor


def _link_seconds(link: str, nbytes: float, rate: float | None) -> float:
    if nbytes < 0:
        raise ValueError(f"{link}: negative byte count {nbytes}")
    if nbytes == 0:
        return 0.0  # a link the configuration does not use costs nothing, whatever its rate
    if rate is None:
        raise ValueError(f"{link}: {nbytes} bytes per token, but this device has no such link")
    return nbytes / rate


def token_floor(
    *,
    disk_bytes: float,
    host_bytes: float,
    h2d_bytes: float,
    dequant_bytes: float,
    compute_s: float,
    rates: LinkRates,
    page_cache: str,
    dequant_codec: str | None = None,
) -> Floor:
    """The physical floor of one decode token: each link's bytes per token over its measured rate,
    and `compute_s` (the decoder compute of all layers for one token). The links can overlap, so the
    floor is the slowest one, not their sum.

    disk_bytes: read from storage per token, at the cold rate when `page_cache` is "cold", else warm.
    host_bytes: copied within host memory. h2d_bytes: moved to the device, at the pinned rate (the
    pageable one where no pinned rate was measured); 0 on CPU. dequant_bytes: decoded (output) bytes,
    at the rate of `dequant_codec` ("8bit" or "4bit", required when dequant_bytes > 0; the rates were
    measured at the codecs' default block sizes).
    """
    check_choice("page_cache", page_cache, PAGE_CACHE_STATES)
    if compute_s < 0:
        raise ValueError(f"compute: negative time {compute_s}")
    disk_rate = rates.disk_read_cold_bytes_per_s if page_cache == "cold" else rates.disk_read_warm_bytes_per_s
    h2d_rate = (
        rates.h2d_pinned_bytes_per_s if rates.h2d_pinned_bytes_per_s is not None else rates.h2d_pageable_bytes_per_s
    )
    dequant_rate = None
    if dequant_bytes > 0:
        if dequant_codec is None:
            raise ValueError("dequant_bytes > 0 needs dequant_codec ('8bit' or '4bit'): the rates differ")
        check_choice("dequant_codec", dequant_codec, DEQUANT_CODECS)
        dequant_rate = rates.dequant_8bit_bytes_per_s if dequant_codec == "8bit" else rates.dequant_4bit_bytes_per_s
    per_link_s = {
        "disk": _link_seconds("disk", disk_bytes, disk_rate),
        "host_copy": _link_seconds("host_copy", host_bytes, rates.host_copy_bytes_per_s),
        "h2d": _link_seconds("h2d", h2d_bytes, h2d_rate),
        "dequant": _link_seconds("dequant", dequant_bytes, dequant_rate),
        "compute": float(compute_s),
    }
    limiting = max(LINKS, key=lambda link: per_link_s[link])  # ties go to the earlier link in LINKS
    return Floor(floor_s=per_link_s[limiting], limiting=limiting, per_link_s=per_link_s)


# ---------------------------------------------------------------- CLI


def _rates_table(rates: LinkRates, title: str) -> object:
    from rich.table import Table

    rows = [
        ("disk read, cold", rates.disk_read_cold_bytes_per_s, "page cache dropped first (posix_fadvise)"),
        ("disk read, warm", rates.disk_read_warm_bytes_per_s, "from the page cache"),
        ("host copy", rates.host_copy_bytes_per_s, "torch copy_ in host memory"),
        ("host -> device, pinned", rates.h2d_pinned_bytes_per_s, ""),
        ("host -> device, pageable", rates.h2d_pageable_bytes_per_s, ""),
        ("dequant 8-bit", rates.dequant_8bit_bytes_per_s, f"blockwise b{_BLOCKSIZE_8BIT}, decoded bytes"),
        ("dequant 4-bit", rates.dequant_4bit_bytes_per_s, f"nf4 b{_BLOCKSIZE_4BIT}, decoded bytes"),
    ]
    table = Table(title=title)
    table.add_column("link")
    table.add_column("GB/s", justify="right")
    table.add_column("note")
    for name, rate, note in rows:
        table.add_row(
            name, "n/a" if rate is None else f"{rate / 1e9:.2f}", note if rate is not None else "no such link"
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--refresh", action="store_true", help="measure again even if a cached result exists")
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/probe"))
    parser.add_argument(
        "--scratch-dir", type=Path, default=None, help="where the disk test file goes (default: the cache dir)"
    )
    parser.add_argument("--size-mib", type=int, default=256, help="bytes moved per disk/copy measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from rich.console import Console

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    rates = load_or_measure(
        device, args.cache_dir, args.scratch_dir or args.cache_dir, refresh=args.refresh, size_bytes=args.size_mib << 20
    )
    title = f"link rates: {rates.device}, {socket.gethostname()}, measured {rates.measured_at}"
    Console().print(_rates_table(rates, title))
    print(f"cached in {cache_path(device, args.cache_dir)}")


if __name__ == "__main__":
    main()
