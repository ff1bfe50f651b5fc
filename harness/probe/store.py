"""The probe's measurements, cached per machine and device.

They take seconds to tens of seconds and do not change between runs, so each is measured once
and kept as JSON beside the others; a file that cannot be read back is measured again. Jobs of a
parallel sweep (hydra/launcher=ray) that miss the same file measure it once: the others wait on a
lock and read what it wrote, instead of measuring links and compute while competing for both.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from harness import allocator
from harness.files import exclusive_lock, write_atomic
from harness.probe.compute import measure_head_compute_s, measure_layer_compute_s
from harness.probe.links import LinkRates, describe_device, device_tag, measure_link_rates
from harness.probe.reads import measure_cold_read_s
from harness.probe.stream import StreamTimes, cache_evictor, layer_counts, measure_stream

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from strategies.cache.configs import CacheConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

_OPTIONAL_RATES = {
    "h2d_pinned_bytes_per_s",
    "h2d_pageable_bytes_per_s",
    "dequant_8bit_bytes_per_s",
    "dequant_4bit_bytes_per_s",
}


# Beside a cache file, this suffix marks it stale (`mark_stale`): the next load re-measures it.
STALE_SUFFIX = ".stale"


# Rates no link of a machine this tool runs on can have: slower than 1 MB/s, or faster than 1 PB/s (the page-cache
# rate times a scan of kept mappings, no copy, and reaches several TB/s). A cached one (a probe that ran while the
# machine stalled, a file edited by hand) is re-measured rather than believed.
PLAUSIBLE_BYTES_PER_S = (1e6, 1e15)


def implausible(rates: LinkRates) -> list[str]:
    """The rates outside PLAUSIBLE_BYTES_PER_S, each named with its value."""
    low, high = PLAUSIBLE_BYTES_PER_S
    return [
        f"{name}={value:.3g} B/s is outside {low:.0e}-{high:.0e} B/s"
        for name, value in asdict(rates).items()
        if isinstance(value, float) and not low <= value <= high
    ]


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
    rates = LinkRates(**{k: float(v) if isinstance(v, int) else v for k, v in data.items()})
    if absurd := implausible(rates):
        raise ValueError(f"implausible: {'; '.join(absurd)}")
    return rates


def _valid_seconds(data: object, key: dict[str, object], field: str) -> bool:
    # Any other JSON (a list, a string, a bool) is re-measured like a damaged file, not a crash.
    if not isinstance(data, dict) or data.get("key") != key:
        return False
    seconds = data.get(field)
    return isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds) and seconds > 0


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a crash mid-write must not leave a half file that a later run would have to reject.
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _host_device(device: torch.device) -> str:
    """The name every cache file of this host and `device` starts with; measured with freed memory reused
    (bench.host_malloc=reuse), a name of its own."""
    policy = "-malloc_reuse" if allocator.current == "reuse" else ""
    return f"{socket.gethostname()}-{device_tag(device)}{policy}"


def cache_path(device: torch.device, cache_dir: Path) -> Path:
    """Where `load_or_measure` keeps the link rates of this host and `device`."""
    return Path(cache_dir) / f"{_host_device(device)}.json"


def _stale_mark(path: Path) -> Path:
    return path.with_name(path.name + STALE_SUFFIX)


def mark_stale(device: torch.device, cache_dir: Path, reason: str) -> list[Path]:
    """Mark every cached measurement of this host and `device` in `cache_dir` (link rates, layer and head
    compute: what priced the floor) stale: the next `load_or_measure*` of each re-measures it, then clears its mark.
    Returns the files marked.

    For a run that beat its floor: which cached figure is wrong is not known, so all of them are measured
    again, each once, when next used. The mark is a file beside the cache file, holding `reason`."""
    prefix = glob.escape(_host_device(device))
    # Not the stream probe's files: they price the plan, not the floor, and cost a pipeline's passes to redo.
    cached = [cache_path(device, cache_dir), *Path(cache_dir).glob(f"{prefix}-layer-*.json"),
              *Path(cache_dir).glob(f"{prefix}-head-*.json")]
    return _mark([path for path in cached if path.is_file()], reason)


def mark_stream_stale(
    device: torch.device, cache_dir: Path, reason: str, config: LlamaConfig, options: dict[str, object]
) -> list[Path]:
    """Mark stale the stream probe's files of this host and `device` for `config`'s geometry and these options
    (cache, compression, prefetch, kv_cache: their configs), in every batch, context, residency and verifying form,
    the cold reads of the options' cache and the geometry's evicted head: what priced a plan that a run then
    contradicted. Returns the files marked."""
    cache = {"cache": asdict(options["cache"])}  # type: ignore[call-overload]
    return _mark(
        _matching(device, cache_dir, "stream", _stream_options_key(config, options))
        + _matching(device, cache_dir, "read", cache)
        + _matching(device, cache_dir, "head", _evicted_head_key(config)),
        reason,
    )


def _matching(device: torch.device, cache_dir: Path, kind: str, wanted: dict[str, object]) -> list[Path]:
    """This host's and `device`'s `kind` files in `cache_dir` whose key holds every item of `wanted`."""
    wanted = json.loads(json.dumps(wanted, default=str))  # as files hold it
    matching = []
    for path in Path(cache_dir).glob(f"{glob.escape(_host_device(device))}-{kind}-*.json"):
        try:
            key = json.loads(path.read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: the next load re-measures it anyway
        if isinstance(key, dict) and all(key.get(name) == value for name, value in wanted.items()):
            matching.append(path)
    return matching


def _mark(paths: list[Path], reason: str) -> list[Path]:
    """Write each path's stale mark, holding `reason`."""
    for path in paths:
        write_atomic(_stale_mark(path), (reason.strip() + "\n").encode("utf-8"))
        logger.info("marked %s stale: the next run measures it again", path.name)
    return paths


def load_or_measure(
    device: torch.device,
    cache_dir: Path,
    scratch_dir: Path,
    refresh: bool = False,
    *,
    size_bytes: int = 256 << 20,
    repeats: int = 3,
    max_age_s: float | None = None,
) -> LinkRates:
    """The cached rates for this host and device, measuring (and caching) them when there are none,
    when the cached file cannot be read or is for another device, or when `refresh` is set."""
    path = cache_path(device, cache_dir)

    def parse(data: object) -> LinkRates:
        rates = _rates_from_json(data)
        if rates.device != describe_device(device):
            raise ValueError(f"measured on {rates.device}, not {describe_device(device)}")
        logger.debug("link rates from %s (measured %s)", path, rates.measured_at)
        return rates

    def measure() -> LinkRates:
        rates = measure_link_rates(device, scratch_dir, size_bytes=size_bytes, repeats=repeats)
        logger.info("link rates cached in %s", path)
        return rates

    return _measured_once(path, refresh, parse, measure, asdict, max_age_s)


def _measured_once(
    path: Path,
    refresh: bool,
    parse: Callable[[object], T | None],
    measure: Callable[[], T],
    to_json: Callable[[T], object],
    max_age_s: float | None = None,
) -> T:
    """What `path` holds (`parse`: None or ValueError when unusable), else measured and written there.
    A file marked stale (`mark_stale`), or written more than `max_age_s` ago, is measured again; a stale mark is
    cleared once the new value is written.

    Measured under a lock beside the file, and looked for again once it is held: jobs that miss the same
    file at once measure it once, instead of each measuring while competing with the others."""
    stale = _stale_mark(path)

    def cached(quiet: bool) -> T | None:
        if refresh or not path.exists():
            return None
        if stale.exists():
            if not quiet:
                logger.warning("re-measuring: cached %s is marked stale (%s)", path, _read_reason(stale))
            return None
        if max_age_s is not None and (age := _age_s(path)) > max_age_s:
            if not quiet:
                logger.info("re-measuring: cached %s is %.1f days old (probe.max_age_days)", path, age / 86400)
            return None
        try:
            return parse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            if not quiet:
                logger.warning("re-measuring: cached %s is unusable (%s)", path, exc)
            return None

    if (value := cached(quiet=False)) is not None:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with exclusive_lock(lock, on_wait=lambda: logger.info("waiting for another job measuring %s", path.name)):
        if (value := cached(quiet=True)) is not None:
            return value  # another job measured it while this one waited
        value = measure()
        _write_json(path, to_json(value))
        stale.unlink(missing_ok=True)  # after the write: a crash between the two leaves the mark, not a stale file
    return value


def _age_s(path: Path) -> float:
    """Seconds since `path` was written (0 when it is gone: a missing file is measured anyway)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


def _read_reason(mark: Path) -> str:
    try:
        return mark.read_text(encoding="utf-8").strip() or "no reason given"
    except OSError as exc:  # removed by a job that re-measured meanwhile, or unreadable: the mark still counts
        return f"reason unreadable: {exc}"


def _cached_seconds(
    path: Path, key: dict[str, object], refresh: bool, measure: Callable[[], float], max_age_s: float | None,
    field: str = "layer_compute_s",
) -> float:
    """Seconds cached in `path` under `key` as `field`, measured (and cached) when absent, stale or damaged."""

    def parse(data: object) -> float | None:
        return float(data[field]) if _valid_seconds(data, key, field) else None

    return _measured_once(path, refresh, parse, measure, lambda seconds: {"key": key, field: seconds}, max_age_s)


def _compute_path(device: torch.device, cache_dir: Path, kind: str, key: dict[str, object]) -> Path:
    tag = "-".join(str(v) for v in key.values())
    return Path(cache_dir) / f"{_host_device(device)}-{kind}-{tag}.json"


def _with_batch(key: dict[str, object], batch: int) -> dict[str, object]:
    # In the key only past one sequence: the files of single-sequence runs keep their names and stay valid.
    return key if batch == 1 else {**key, "batch": batch}


def _layer_geometry(config: LlamaConfig, *extra: str) -> dict[str, object]:
    """What a decoder layer's cost depends on in `config`, and the `extra` fields named."""
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", *extra)
    return {key: getattr(config, key) for key in fields}


def load_or_measure_layer_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path, seq_len: int = 1,
    refresh: bool = False, batch: int = 1, max_age_s: float | None = None,
) -> float:
    """`measure_layer_compute_s`, cached beside the link rates per host, device, geometry, dtype, seq_len and
    batch.

    Measured once, the floor stays put between runs; re-measured in every run, a shared host's noise would go
    straight into every floor ratio.
    """
    geometry = _layer_geometry(config)
    key = _with_batch({**geometry, "dtype": str(dtype).removeprefix("torch."), "seq_len": seq_len}, batch)
    path = _compute_path(device, cache_dir, "layer", key)
    return _cached_seconds(
        path, key, refresh, lambda: measure_layer_compute_s(config, device, dtype, seq_len=seq_len, batch=batch),
        max_age_s,
    )


def load_or_measure_head_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path, refresh: bool = False,
    batch: int = 1, max_age_s: float | None = None, evicted: bool = False,
) -> float:
    """`measure_head_compute_s` (final norm + lm_head, the last position of each of `batch` sequences), cached
    like the layer's: its best, the floor's. `evicted`: its median after `cache_evictor`'s write for `config`, as
    a run computes it after its decoder layers (the plan's), cached per decoder geometry too."""
    dtype_name = str(dtype).removeprefix("torch.")
    key = _with_batch({"hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "dtype": dtype_name}, batch)
    if not evicted:
        path = _compute_path(device, cache_dir, "head", key)
        return _cached_seconds(
            path, key, refresh, lambda: measure_head_compute_s(config, device, dtype, batch=batch), max_age_s
        )
    path, key = _keyed_path(device, cache_dir, "head", {**key, **_evicted_head_key(config)})
    return _cached_seconds(
        path, key, refresh,
        lambda: measure_head_compute_s(config, device, dtype, batch=batch, evict=cache_evictor(config, device)),
        max_age_s,
    )


def _evicted_head_key(config: LlamaConfig) -> dict[str, object]:
    """What an evicted head's cost depends on beside its own shape: the bytes the run's decoder layers decode to."""
    return {"evicted": True, **_layer_geometry(config, "num_hidden_layers", "vocab_size")}


def _stream_options_key(config: LlamaConfig, options: dict[str, object]) -> dict[str, object]:
    """The part of a stream probe's key that a run's geometry and options decide, whatever its batch, context and
    residency. The layer count too: how many bytes the probe writes to evict the device's caches depends on it
    (cache_evictor)."""
    chosen = {group: asdict(option) for group, option in sorted(options.items())}  # type: ignore[call-overload]
    return {**_layer_geometry(config, "num_hidden_layers"), **chosen}


def _keyed_path(
    device: torch.device, cache_dir: Path, kind: str, key: dict[str, object]
) -> tuple[Path, dict[str, object]]:
    """Where a `kind` measurement under `key` is cached (named by the key's digest), and the key as the file holds
    it (tuples as lists, other objects as strings)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{_host_device(device)}-{kind}-{digest}.json", json.loads(json.dumps(key, default=str))


def load_or_measure_cold_read_s(
    cache: CacheConfig, device: torch.device, size_bytes: int, cache_dir: Path, refresh: bool = False,
    max_age_s: float | None = None,
) -> float:
    """`measure_cold_read_s` (the cache `cache` configures, reading a `size_bytes` file from a cold page cache),
    cached beside the link rates per host, device, cache config and size."""
    path, key = _keyed_path(device, cache_dir, "read", {"cache": asdict(cache), "size_bytes": size_bytes})
    return _cached_seconds(
        path, key, refresh, lambda: measure_cold_read_s(cache, device, size_bytes, Path(cache_dir)), max_age_s,
        field="read_s",
    )


def load_or_measure_stream(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path, refresh: bool = False, *,
    options: dict[str, object], batch: int = 1, context: int = 8, resident: bool = False, steps: int = 1,
    verify: str = "exact", max_age_s: float | None = None,
) -> StreamTimes:
    """`measure_stream` for these options (cache, compression, prefetch, kv_cache: their configs), cached beside the
    link rates per host, device, geometry (layer count included), dtype, options, batch, context, residency and
    verifying steps, and by the truncated models' layer counts (a figure taken from other counts is re-measured)."""
    key = {
        **_stream_options_key(config, options), "dtype": str(dtype).removeprefix("torch."), "batch": batch,
        "context": context, "resident": resident, **({"steps": steps, "verify": verify} if steps > 1 else {}),
        "layer_counts": list(layer_counts(config)),
    }
    path, key = _keyed_path(device, cache_dir, "stream", key)

    def parse(data: object) -> StreamTimes | None:
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        values = [data.get(name) for name in ("layer_s", "pass_s")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return None
        layer_s, pass_s = (float(v) for v in values)  # type: ignore[arg-type]
        return StreamTimes(layer_s, pass_s) if layer_s > 0 and pass_s >= 0 else None

    def measure() -> StreamTimes:
        return measure_stream(
            config, device, dtype, scratch_dir=Path(cache_dir), batch=batch, context=context, resident=resident,
            steps=steps, verify=verify, **options,  # type: ignore[arg-type]
        )

    return _measured_once(path, refresh, parse, measure, lambda t: {"key": key, **asdict(t)}, max_age_s)
