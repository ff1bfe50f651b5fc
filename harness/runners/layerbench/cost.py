"""The cost model a plan predicts a token's time with (docs/cost-model.md).

A decode pass is its decoder layers, each streamed or resident, plus its head (final norm and lm_head) and what
the pass costs beside them. A decoder layer's cost is measured by the stream probe (harness/probe/stream.py)
through the run's own cache, codec, prefetcher and KV cache on truncated models of the run's geometry: fixed
per-unit costs, reads as the cache reads a layer file of that size, decode, compute, and how prefetch overlaps
them on this machine's cores are all in it. The head is priced apart, because the truncated models' vocabulary is
cut: from the head compute probe (after the stream probe's eviction), the link rates (as the floor loaded them)
and, cold, the cold read probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import Config
from harness.measurement.vram import decoded_bytes
from harness.probe.links import LinkRates
from harness.probe.store import load_or_measure_cold_read_s, load_or_measure_head_compute_s, load_or_measure_stream
from harness.runners.layerbench.setup import Setup

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from strategies.compression.base import Codec


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


def head_decode_s(config: LlamaConfig, codec: Codec, rates: LinkRates) -> float:
    """Decoding lm_head once, at the codec's probed dequant rate: nothing where the codec stores it plain."""
    if not codec.bits or codec.stores_plain("lm_head"):
        return 0.0
    rate = rates.dequant_bytes_per_s(codec.bits)
    return decoded_bytes(config, ["lm_head"]) / rate if rate else 0.0


def _context(setup: Setup, cfg: Config) -> int:
    """The positions the run's decode passes attend to, on average."""
    return context_positions(max(len(p) for p in setup.prompts), cfg.workload.max_new_tokens)


def stream_options(cfg: Config) -> dict[str, object]:
    """The options the stream probe measures a run's layers under, by group."""
    return {"cache": cfg.cache, "compression": cfg.compression, "prefetch": cfg.prefetch, "kv_cache": cfg.kv_cache}


def _freshness(cfg: Config) -> tuple[bool, float]:
    """The probe cache's `refresh` and `max_age_s`, as `cfg.probe` sets them."""
    return cfg.probe.refresh, cfg.probe.max_age_days * 86400


def head_seconds(
    setup: Setup, cfg: Config, rates: LinkRates, head_compute_s: float, kept_mapping_bytes_per_s: float | None,
    probe_dir: Path,
) -> float:
    """The head's seconds: its compute, and, where it streams, its files' fetch (read as the cache reads them, then
    copied to the device) and decode, overlapped with the compute when prefetch loads ahead. Cold, each file's read
    is the cold read probe's at its size (in `probe_dir`); warm, the kept mappings' rate."""
    layout, pipeline = setup.layout, setup.pipeline
    streamed = [u for u in ("norm", "lm_head") if u not in setup.residency.units]
    nbytes = float(layout.files_bytes(streamed)) if streamed else 0.0
    fetch = 0.0
    if pipeline.cache.rereads and nbytes and cfg.cache.cold:
        refresh, max_age_s = _freshness(cfg)
        sizes = {layout.file(u): layout.file_bytes(u) for u in streamed}  # a file two units share is read once
        fetch += sum(
            load_or_measure_cold_read_s(cfg.cache, setup.device, size, probe_dir, refresh, max_age_s)
            for size in sizes.values()
        )
    elif pipeline.cache.rereads and nbytes:
        fetch += nbytes / (kept_mapping_bytes_per_s or rates.page_cache_bytes_per_s)
    if setup.device.type != "cpu" and nbytes:
        h2d = rates.h2d_pinned_bytes_per_s or rates.h2d_pageable_bytes_per_s
        fetch += nbytes / h2d if h2d else 0.0
    decode = head_decode_s(setup.config, pipeline.codec, rates) if "lm_head" in streamed else 0.0
    if pipeline.prefetcher.layers_ahead > 0:
        return max(head_compute_s, fetch + decode)
    return head_compute_s + fetch + decode


def token_cost(
    setup: Setup, cfg: Config, rates: LinkRates, probe_dir: Path, kept_mapping_bytes_per_s: float | None = None,
    steps: int = 1,
) -> TokenCost:
    """The predicted seconds of one decode pass of `setup` as `cfg` configures it: the stream probes and the
    evicted head's compute cached in `probe_dir` (each measured there first when missing), and the link rates.
    `steps` > 1: speculative decoding's verifying pass, which scores that many positions a sequence as
    `decoding.verify` says (its head, batch x steps rows)."""
    config, device = setup.config, setup.device
    options = stream_options(cfg)
    context = _context(setup, cfg)
    batch = len(setup.prompts)
    refresh, max_age_s = _freshness(cfg)
    head_compute_s = load_or_measure_head_compute_s(
        config, device, config.dtype, probe_dir, refresh, batch=batch * steps, max_age_s=max_age_s, evicted=True
    )

    def stream(resident: bool) -> tuple[float, float]:
        times = load_or_measure_stream(
            config, device, config.dtype, probe_dir, refresh, options=options, batch=batch, context=context,
            resident=resident, steps=steps, verify=cfg.decoding.verify, max_age_s=max_age_s,
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
        head_s=head_seconds(setup, cfg, rates, head_compute_s, kept_mapping_bytes_per_s, probe_dir),
    )


@dataclass(frozen=True)
class SpeculativeCost:
    """A speculative round: each sequence's draft proposes `k` tokens, one step at a time, then one streamed pass of
    the target verifies them all; a round yields the accepted drafts and one token of the target's own. Before its
    first round, each sequence's draft reads the prompt and the target's first token in one call."""

    verify: TokenCost  # the target's verifying pass, k + 1 positions a sequence
    draft_step_s: float  # one step of the resident draft, one sequence
    k: int
    sequences: int  # each sequence drafts on its own
    draft_prefill_s: float  # the draft's first call, over the prompt and the first token, one sequence
    new_tokens: int  # a sequence's generated tokens: the prefill is spread over the gaps between them

    @property
    def round_s(self) -> float:
        return self.verify.total_s + self.sequences * self.k * self.draft_step_s

    def per_token_s(self, accepted_per_pass: float) -> float:
        """Seconds a token, when the target accepts `accepted_per_pass` of a sequence's k drafts a round. The
        draft's prefill falls after the first token, so it is shared by the gaps from token 1 to the last."""
        prefill = self.sequences * self.draft_prefill_s / max(1, self.new_tokens - 1)
        return self.round_s / (accepted_per_pass + 1) + prefill


def speculative_cost(
    setup: Setup, cfg: Config, rates: LinkRates, probe_dir: Path, kept_mapping_bytes_per_s: float | None = None,
) -> SpeculativeCost:
    """A speculative round of `setup` (whose draft is built), priced by the same probes as a greedy pass: the
    verifying pass by the stream probe at k + 1 positions, a draft step by the stream probe on the draft's geometry
    with every layer resident in the form the draft holds, plus its head's compute; the draft's prefill as that
    probe's pass over the prompt and one token in one call."""
    draft, k, batch = setup.draft, cfg.decoding.k, len(setup.prompts)
    if draft is None:
        raise ValueError("speculative_cost prices a run with a draft: decoding=speculative builds one")
    refresh, max_age_s = _freshness(cfg)
    device = setup.device
    verify = token_cost(setup, cfg, rates, probe_dir, kept_mapping_bytes_per_s, steps=k + 1)
    small = draft.model.config
    draft_head_s = load_or_measure_head_compute_s(
        small, device, small.dtype, probe_dir, refresh, max_age_s=max_age_s, evicted=True
    )
    decode_s = head_decode_s(small, draft.model.pipeline.codec, rates)  # held stored: decoded at each step too

    def draft_call_s(positions: int, context: int) -> float:
        """One call of the draft over `positions` new positions after `context` cached ones, its head included."""
        times = load_or_measure_stream(
            small, device, small.dtype, probe_dir, refresh, options=draft.options, context=context, resident=True,
            max_age_s=max_age_s, **({"steps": positions, "verify": "batched"} if positions > 1 else {}),
        )
        return times.pass_s + small.num_hidden_layers * times.layer_s + draft_head_s + decode_s

    # The probe times its call after a cache of `context` positions, so the prefill is priced attending to twice the
    # prompt: an over-estimate by the attention over one prompt, small beside reading every layer's weights.
    prompt = max(len(p) for p in setup.prompts) + 1
    return SpeculativeCost(
        verify=verify, draft_step_s=draft_call_s(1, _context(setup, cfg)), k=k, sequences=batch,
        draft_prefill_s=draft_call_s(prompt, prompt), new_tokens=cfg.workload.max_new_tokens,
    )
