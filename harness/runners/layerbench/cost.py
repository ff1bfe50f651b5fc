"""The cost model a plan predicts a token's time with (docs/cost-model.md).

A decode pass is its decoder layers, each streamed or resident, plus its head (final norm and lm_head) and what
the pass costs beside them. A decoder layer's cost is measured by the stream probe (harness/probe/stream.py)
through the run's own cache, codec, prefetcher and KV cache on truncated models of the run's geometry: fixed
per-unit costs, reads as the cache reads a layer file of that size, decode, compute, and how prefetch overlaps
them on this machine's cores are all in it. The head is priced from the link rates and the head compute probe (as
the floor loaded them), because the truncated models' vocabulary is cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.config import Config
from harness.measurement.vram import decoded_bytes
from harness.probe.links import LinkRates
from harness.probe.store import load_or_measure_stream
from harness.runners.layerbench.setup import Setup


@dataclass(frozen=True)
class TokenCost:
    """A decode pass's predicted seconds, by term."""

    pass_s: float  # beside the decoder layers and the head: embedding, rope and mask, bookkeeping
    streamed_s: float  # the streamed decoder layers
    resident_s: float  # the resident decoder layers (decoded and computed, never fetched)
    head_s: float  # final norm and lm_head: fetched and decoded when streamed, and computed

    @property
    def total_s(self) -> float:
        return self.pass_s + self.streamed_s + self.resident_s + self.head_s


def context_positions(workload_prompt: int, new_tokens: int) -> int:
    """The positions a decode pass attends to, on average over a generation of `new_tokens` after the prompt."""
    return max(1, int(workload_prompt + new_tokens / 2))


def head_seconds(
    setup: Setup, cfg: Config, rates: LinkRates, head_compute_s: float, kept_mapping_bytes_per_s: float | None
) -> float:
    """The head's seconds: its compute, and, where it streams, its file's fetch (read as the cache reads it, then
    copied to the device) and decode, overlapped with the compute when prefetch loads ahead."""
    layout, pipeline = setup.layout, setup.pipeline
    streamed = [u for u in ("norm", "lm_head") if u not in setup.residency.units]
    nbytes = float(layout.files_bytes(streamed)) if streamed else 0.0
    fetch = 0.0
    if pipeline.cache.rereads and nbytes:
        warm = kept_mapping_bytes_per_s or rates.page_cache_bytes_per_s
        fetch += nbytes / (rates.disk_read_cold_bytes_per_s if cfg.cache.cold else warm)
    if setup.device.type != "cpu" and nbytes:
        h2d = rates.h2d_pinned_bytes_per_s or rates.h2d_pageable_bytes_per_s
        fetch += nbytes / h2d if h2d else 0.0
    decode = 0.0
    codec = pipeline.codec
    if codec.bits and "lm_head" in streamed and not codec.stores_plain("lm_head"):
        rate = rates.dequant_bytes_per_s(codec.bits)
        decode = decoded_bytes(setup.config, ["lm_head"]) / rate if rate else 0.0
    if pipeline.prefetcher.layers_ahead > 0:
        return max(head_compute_s, fetch + decode)
    return head_compute_s + fetch + decode


def token_cost(
    setup: Setup, cfg: Config, rates: LinkRates, head_compute_s: float, probe_dir: Path,
    kept_mapping_bytes_per_s: float | None = None,
) -> TokenCost:
    """The predicted seconds of one decode pass of `setup` as `cfg` configures it: the stream probes cached in
    `probe_dir` (each measured there first when missing), the link rates and the head's compute the floor's
    probes gave."""
    config, device, workload = setup.config, setup.device, cfg.workload
    options = {"cache": cfg.cache, "compression": cfg.compression, "prefetch": cfg.prefetch, "kv_cache": cfg.kv_cache}
    context = context_positions(max(len(p) for p in setup.prompts), workload.max_new_tokens)
    batch = len(setup.prompts)
    refresh, max_age_s = cfg.probe.refresh, cfg.probe.max_age_days * 86400

    def stream(resident: bool) -> tuple[float, float]:
        times = load_or_measure_stream(
            config, device, config.dtype, probe_dir, refresh, options=options, batch=batch, context=context,
            resident=resident, max_age_s=max_age_s,
        )
        return times.layer_s, times.pass_s

    layers = config.num_hidden_layers
    resident = sum(u.startswith("layers.") for u in setup.residency.units)
    layer_s, pass_s = stream(resident=False) if resident < layers else (0.0, 0.0)
    resident_layer_s = 0.0
    if resident:
        resident_layer_s, resident_pass_s = stream(resident=True)
        pass_s = pass_s if resident < layers else resident_pass_s
    return TokenCost(
        pass_s=pass_s,
        streamed_s=(layers - resident) * layer_s,
        resident_s=resident * resident_layer_s,
        head_s=head_seconds(setup, cfg, rates, head_compute_s, kept_mapping_bytes_per_s),
    )
