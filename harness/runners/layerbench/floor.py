"""The floor a streamed run is measured against: the probe's link rates, a plain read and the kept mappings.

Each asks the strategies what applies (`KVCachePolicy.recomputes_sequence`, `Codec.bits`,
`Cache.rereads`) instead of comparing option names, so a new option needs no edit here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from harness.config_planning import ProbeConfig
from harness.measurement.run_report import RunReport
from harness.measurement.units import format_metric
from harness.probe.floor import Floor, token_floor
from harness.probe.links import LinkRates, kept_mapping_rate, plain_read_rate
from harness.probe.store import (
    load_or_measure,
    load_or_measure_head_compute_s,
    load_or_measure_layer_compute_s,
    mark_stale,
)
from harness.runners.layerbench.setup import Setup
from strategies.cache.configs import CacheConfig

# How far below its floor a run's per-token time may be before the floor is called wrong. Not zero: the floor's
# rates and compute are the best of a few probe repeats taken at another moment (clock boost, a neighbour's load),
# and the run's own read rate replaces the probe's, so a run measured as well as the probe can land a few percent
# under it by noise alone. Past 5% that noise does not explain it: a cached rate is stale or prices other work.
FLOOR_TOLERANCE = 0.05


def link_floor(
    setup: Setup, probe: ProbeConfig, cache: CacheConfig, probe_dir: Path, *, disk_bytes: float, h2d_bytes: float,
    dequant_bytes: float, seq_len: int, plain_read_bytes_per_s: float | None = None,
    kept_mapping_bytes_per_s: float | None = None, batch: int = 1,
) -> tuple[Floor, LinkRates, float, float]:
    """The floor of one token moving these bytes per pass, from the probe's link rates (measured once per
    machine, cached in `probe_dir`) and the compute of every layer for `batch` sequences of `seq_len` positions
    each, plus the head; also the rates and compute times."""
    max_age_s = probe.max_age_days * 86400
    rates = load_or_measure(
        setup.device, probe_dir, probe_dir, refresh=probe.refresh, size_bytes=probe.size_mib << 20,
        max_age_s=max_age_s,
    )
    config = setup.config
    layer_s = load_or_measure_layer_compute_s(
        config, setup.device, config.dtype, probe_dir, seq_len, probe.refresh, batch=batch, max_age_s=max_age_s
    )
    # Each sequence's last position through the final norm and lm_head: a decoder layer's worth of bytes at a
    # 128k vocab, and the runner computes it for every sequence of the batch.
    head_s = load_or_measure_head_compute_s(
        config, setup.device, config.dtype, probe_dir, probe.refresh, batch=batch, max_age_s=max_age_s
    )
    disk_rates = rates
    if plain_read_bytes_per_s is not None:
        # A cold run read its own split files plainly (read_metrics): that rate, not the probe's scratch file's,
        # bounds its disk link (the two can differ by 2x: docs/findings.md).
        disk_rates = replace(rates, disk_read_cold_bytes_per_s=plain_read_bytes_per_s)
    if kept_mapping_bytes_per_s is not None:
        # Warm, likewise: a pass over the run's own kept mappings (a page-table scan when nothing was evicted)
        # depends on how much is mapped; the probe's 256 MiB scratch file is not the run's split.
        disk_rates = replace(disk_rates, page_cache_bytes_per_s=kept_mapping_bytes_per_s)
    codec = setup.pipeline.codec
    floor = token_floor(
        disk_bytes=disk_bytes,
        host_bytes=0.0,  # cached host copies are read in place; their cost shows as H2D or compute
        h2d_bytes=h2d_bytes,
        dequant_bytes=dequant_bytes if codec.bits else 0.0,
        dequant_bits=codec.bits,
        compute_s=layer_s * config.num_hidden_layers + head_s,
        rates=disk_rates,
        page_cache=cache.page_cache,
    )
    return floor, rates, layer_s, head_s


def pass_seq_len(setup: Setup, prompt_tokens: float, new_tokens: float) -> int:
    """The positions a decode pass computes per sequence: one with a KV cache; without one the whole sequence,
    at its mean. A batch computes that many for each of its sequences (`link_floor`'s `batch`)."""
    return int(prompt_tokens + new_tokens / 2) if setup.model.kv_policy.recomputes_sequence else 1


def floor_metrics(
    setup: Setup, probe: ProbeConfig, cache: CacheConfig, batch_size: int, report: RunReport, probe_dir: Path
) -> tuple[dict[str, float], dict[str, str]]:
    """The per-token floor from the measured links and one layer's compute, and how far the run is from it;
    and the link rates themselves as tags: they describe the machine, not the run, so they are no metrics."""
    floor, rates, layer_s, head_s = link_floor(
        setup, probe, cache, probe_dir,
        disk_bytes=report.read_bytes_per_pass, h2d_bytes=report.h2d_bytes_per_pass,
        dequant_bytes=report.decode_bytes_per_pass,
        seq_len=pass_seq_len(setup, report.prompt_tokens, report.new_tokens), batch=batch_size,
        plain_read_bytes_per_s=report.plain_read_bytes_per_s,
        kept_mapping_bytes_per_s=report.kept_mapping_bytes_per_s,
    )
    out = {"floor_s": floor.floor_s, "layer_compute_s": layer_s, "head_compute_s": head_s}
    out.update({f"floor_{link}_s": seconds for link, seconds in floor.per_link_s.items()})
    if report.tpot_s is not None and floor.floor_s > 0:
        out["floor_ratio"] = report.tpot_s / floor.floor_s
    tags = {f"link.{k}": format_metric(k, v) for k, v in vars(rates).items() if isinstance(v, float)}
    tags["link.measured_at"] = rates.measured_at
    return out, tags


def beaten_floor(tpot_s: float | None, floor_s: float | None) -> str | None:
    """What is wrong when the per-token time is below the floor by more than FLOOR_TOLERANCE; else None.

    A floor is a lower bound: a run under it has not beaten physics, its floor was priced wrong."""
    if tpot_s is None or floor_s is None or tpot_s >= floor_s * (1 - FLOOR_TOLERANCE):
        return None
    return (
        f"per token {format_metric('tpot_s', tpot_s)} is below the floor {format_metric('floor_s', floor_s)} "
        f"by {1 - tpot_s / floor_s:.0%} (more than {FLOOR_TOLERANCE:.0%}): the floor is wrong, not the run; "
        "the probe's cached rates will be re-measured on the next run"
    )


def check_floor(setup: Setup, report: RunReport, probe_dir: Path) -> str | None:
    """`beaten_floor` for this run; when beaten, the probe caches that priced the floor are marked stale
    (`mark_stale`), so the next run measures them again instead of reporting the same wrong floor.

    Not for speculative decoding: a pass there yields several tokens, so a token may take less than the floor of
    the pass that verified it (floor_s prices a pass, tpot_s is per token)."""
    if setup.draft is not None:
        return None
    problem = beaten_floor(report.tpot_s, report.floor_s)
    if problem is not None:
        mark_stale(setup.device, probe_dir, problem)
    return problem


def kept_mapping_metrics(setup: Setup, cache: CacheConfig) -> dict[str, float]:
    """Warm, with a cache that rereads every pass: one pass over the kept mappings of the files the run streams,
    the warm disk link its plan and floor use; measured before the run."""
    if cache.cold or not setup.pipeline.cache.rereads:
        return {}
    layout = setup.layout
    streamed = [u for u in layout.units if u not in setup.residency.units]
    return {"kept_mapping_bytes_per_s": kept_mapping_rate(list(dict.fromkeys(map(layout.file, streamed))))}


def read_metrics(setup: Setup, cache: CacheConfig, report: RunReport) -> dict[str, float]:
    """With a cold page cache, the read stage against a plain sequential read of the same files, dropped first.

    Cold only: that is the question the figure answers (does streaming read storage at its speed?), and
    the plain read costs a second read of the whole split, which a warm run would pay for no answer.
    """
    if not cache.cold or report.read_bandwidth_bytes_per_s is None:
        return {}
    layout = setup.layout
    paths = list(dict.fromkeys(layout.file(unit) for unit in layout.units))
    plain = plain_read_rate(paths, cold=True)
    return {"plain_read_bytes_per_s": plain, "read_efficiency": report.read_bandwidth_bytes_per_s / plain}
