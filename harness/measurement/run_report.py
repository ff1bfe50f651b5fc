"""The run report: every figure one job measured, as typed fields whose names carry their units.

One object flows from the job to the console summary, to MLflow (`metrics()`, the flat names
MLflow stores) and back from MLflow (`from_metrics`, for `python -m harness.report`). Names end
in their unit (`_s`, `_bytes`, `_per_s`, `_ratio`/`ratio_`, `_share`), which is how
`harness.measurement.units` formats them. A figure that does not apply stays None: absent in the
summary and in MLflow, never 0. The producers (token timing, the timeline, the VRAM monitor, the
floor, the transformers reference, the quality pass) hand in flat dicts; `add` refuses a name
that is no field here, so a typo cannot reach MLflow as a new metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Over repeats every figure is a mean; these suffixes carry its spread (bench.repeats > 1) and, for the figures
# comparisons read, the bounds of its 95% interval and its median over the generations (harness.measurement.stats).
CI_SUFFIXES = ("_ci95_low", "_ci95_high")
MEDIAN_SUFFIX = "_median"
# The metric history of a compared figure, one value a measured generation (`tpot_s_by_generation`, steps 1..n).
BY_GENERATION = "_by_generation"
SPREAD_SUFFIXES = ("_std", "_cv", *CI_SUFFIXES, MEDIAN_SUFFIX)


def figure(label: str = "") -> Any:
    """A measured figure; `label` names it in the console summary (unlabelled figures go to MLflow only)."""
    return field(default=None, metadata={"label": label})


@dataclass
class RunReport:
    # --- tokens (docs/metrics.md's definitions; the mean over repeats)
    ttft_s: float | None = figure("time to first token")
    tpot_s: float | None = figure("per-token latency (mean)")
    token_latency_p50_s: float | None = figure("per-token latency p50")
    token_latency_p90_s: float | None = figure("per-token latency p90")
    token_latency_p99_s: float | None = figure()
    decode_tokens_per_s: float | None = figure("decode throughput")
    new_tokens: float | None = figure("new tokens")
    # --- energy (harness.measurement.energy: NVML on CUDA, RAPL on a CPU where readable; the energy.source tag)
    energy_prefill_j: float | None = figure("energy, prefill")
    energy_per_token_j: float | None = figure("energy per token")
    power_mean_w: float | None = figure("mean power")
    # Generations run and thrown away before the measured ones (bench.warmup; with auto, as many as its rule took).
    warmup_generations: float | None = figure("warm-up generations")
    prompt_tokens: float | None = figure()
    passes: float | None = figure()

    # --- bytes moved per pass, by stage
    read_bytes_per_pass: float | None = figure("bytes read per pass")
    read_bytes_first_pass: float | None = figure()
    h2d_bytes_per_pass: float | None = figure()
    decode_bytes_per_pass: float | None = figure()
    kv_cache_bytes: float | None = figure()
    kv_bytes_per_token: float | None = figure()

    # --- where a decode pass's time goes (timeline stages: read, h2d, decode, compute, release)
    stage_read_s: float | None = figure()
    stage_h2d_s: float | None = figure()
    stage_decode_s: float | None = figure()
    stage_compute_s: float | None = figure()
    stage_release_s: float | None = figure()
    # Host seconds a pass took to issue its compute: on CUDA, near stage_compute_s when launches set the pace.
    compute_issue_s: float | None = figure()
    # The same for the loads (fetch and decode), on the prefetch worker when prefetch is on.
    load_issue_s: float | None = figure()
    stage_read_share: float | None = figure()
    stage_h2d_share: float | None = figure()
    stage_decode_share: float | None = figure()
    stage_compute_share: float | None = figure()
    stage_release_share: float | None = figure()
    read_bandwidth_bytes_per_s: float | None = figure()
    h2d_bandwidth_bytes_per_s: float | None = figure()
    decode_bandwidth_bytes_per_s: float | None = figure()
    # Cold page cache: the read stage against a plain sequential read of the same files, dropped first.
    plain_read_bytes_per_s: float | None = figure()
    read_efficiency: float | None = figure("read / plain sequential read")
    # Warm: one pass over the run's own kept mappings, made resident again (the warm disk link it is priced at).
    kept_mapping_bytes_per_s: float | None = figure()
    # Prefetch off: the worst pass's |wall - sum of stages| / wall. Prefetch on: time hidden / hideable.
    crosscheck_residual: float | None = figure()
    overlap_efficiency: float | None = figure()

    # runner.cuda_graph: decoder layers replayed as CUDA graphs at the run's end; 0 when a capture failed (the
    # reason in the warning.cuda_graph tag), the run then eager throughout
    graph_layers: float | None = figure("decoder layers replayed as CUDA graphs")

    # --- the split
    split_s: float | None = figure("split")
    split_files_written: float | None = figure()
    split_bytes_written: float | None = figure()
    split_largest_file_bytes: float | None = figure()
    split_total_bytes: float | None = figure()
    split_layer_file_bytes: float | None = figure()
    split_peak_anon_delta_bytes: float | None = figure()

    # --- residency: units kept on the device for the whole run, loaded once (not part of any pass)
    resident_layers: float | None = figure("decoder layers resident")
    streamed_layers: float | None = figure()
    resident_bytes: float | None = figure("resident bytes")
    resident_load_s: float | None = figure()
    # The plan's per-token time from the cost model, before the run, and the measured one over it; and the
    # prediction by term (harness/runners/layerbench/cost.py): the pass beside its layers, the streamed and the
    # resident decoder layers, the head.
    plan_predicted_s: float | None = figure("predicted per token (plan)")
    plan_ratio: float | None = figure("per-token time / predicted")
    plan_pass_s: float | None = figure()
    plan_streamed_s: float | None = figure()
    plan_resident_s: float | None = figure()
    plan_head_s: float | None = figure()
    plan_draft_step_s: float | None = figure()  # decoding=speculative: one step of the resident draft
    plan_draft_prefill_s: float | None = figure()  # and its first call, over the prompt

    # --- decoding=speculative: draft tokens accepted, per verifying pass of the target, and what it costs
    spec_accepted_share: float | None = figure("draft tokens accepted")
    spec_accepted_per_pass: float | None = figure("accepted per target pass")
    spec_tokens_per_pass: float | None = figure()
    spec_passes_per_token: float | None = figure("target passes per token")
    spec_draft_share: float | None = figure()
    spec_draft_bytes: float | None = figure()
    spec_draft_step_s: float | None = figure()

    # --- a peer runner (runner=transformers|accelerate|airllm): loading the model, its own split included
    load_s: float | None = figure("model load")

    # --- memory (VRAM figures only on CUDA)
    peak_rss_bytes: float | None = figure("peak host RSS")
    cache_bytes_held: float | None = figure()
    peak_vram_allocated_bytes: float | None = figure("peak VRAM (allocated)")
    peak_vram_reserved_bytes: float | None = figure()
    peak_vram_nvml_bytes: float | None = figure("peak VRAM (NVML)")
    cuda_context_bytes: float | None = figure()
    # Host seconds one reading of the peak sampler took (mean, slowest): NVML's process list, every
    # vram.sample_interval_s, on a thread beside the run's, and through the same driver as its launches.
    nvml_read_s: float | None = figure()
    nvml_read_max_s: float | None = figure()
    # The context, streaming's estimate from the geometry, the resident set and a draft: what the cap was held to
    vram_estimate_bytes: float | None = figure()
    # cudaMalloc calls after the first token, per token: whether streamed weights reuse device memory
    device_allocs_per_token: float | None = figure()
    device_alloc_retries_per_token: float | None = figure()  # cached blocks all freed to fit one: a device wait

    # --- the host while the generation ran: this process's CPU seconds per second (the prefetch worker's and the
    # samplers' included), the hypervisor's steal, and the time the cgroup's CPU quota held the process back
    process_cpu_share: float | None = figure()
    host_steal_share: float | None = figure()
    cpu_throttled_share: float | None = figure()
    # A fixed pure-Python loop timed at each new token (median): the host's speed for this process's own work, which
    # a vCPU slowed by its neighbours loses without any steal to show for it.
    host_loop_s: float | None = figure()

    # --- the physical floor: each link's time for a token's bytes, the slowest one, and how far the run is
    floor_s: float | None = figure("floor per token (slowest link)")
    floor_ratio: float | None = figure("per-token time / floor")
    floor_disk_s: float | None = figure()
    floor_host_copy_s: float | None = figure()
    floor_h2d_s: float | None = figure()
    floor_dequant_s: float | None = figure()
    floor_compute_s: float | None = figure()
    layer_compute_s: float | None = figure()
    head_compute_s: float | None = figure()  # final norm + lm_head, one position

    # --- transformers' resident generate on the same checkpoint and prompt (reference.enabled)
    reference_ttft_s: float | None = figure()
    reference_tpot_s: float | None = figure("transformers generate, per token")
    reference_token_latency_p50_s: float | None = figure()
    reference_token_latency_p90_s: float | None = figure()
    reference_token_latency_p99_s: float | None = figure()
    reference_decode_tokens_per_s: float | None = figure()
    reference_new_tokens: float | None = figure()
    reference_tokens_match: float | None = figure()
    # The fixed loop during the reference's generations: beside host_loop_s, whether the host ran both at one speed.
    reference_host_loop_s: float | None = figure()
    # Greedy tokens equal to transformers' on the uncompressed checkpoint, position by position (1.0: all).
    agreement_vs_transformers: float | None = figure("tokens agreeing with transformers")
    tpot_ratio_vs_reference: float | None = figure("per-token time vs transformers")

    # --- what a lossy codec costs, against the uncompressed split (quality.enabled): over the shipped
    # texts' positions (quality_positions), and over the run's own tokens (quality_run_*)
    quality_top1_agreement: float | None = figure("top-1 agreement vs uncompressed")
    quality_kl_mean: float | None = figure("KL vs uncompressed (mean)")
    quality_positions: float | None = figure("positions compared")
    quality_ppl: float | None = figure("perplexity")
    quality_ppl_reference: float | None = figure("perplexity, uncompressed")
    quality_text_tokens: float | None = figure()
    quality_ppl_essay: float | None = figure()
    quality_ppl_essay_reference: float | None = figure()
    quality_essay_tokens: float | None = figure()
    quality_run_top1_agreement: float | None = figure()
    quality_run_kl_mean: float | None = figure()
    quality_run_positions: float | None = figure()
    # --- what a lossy KV cache costs (kv_cache=quantized, quality.enabled), against a plain cache, over the
    # shipped texts' positions decoded through the cache
    kv_quality_top1_agreement: float | None = figure("top-1 agreement vs plain KV cache")
    kv_quality_kl_mean: float | None = figure("KL vs plain KV cache (mean)")
    kv_quality_positions: float | None = figure()

    # Spread over repeats: "<figure>_std" / "<figure>_cv" / "<figure>_ci95_low" / "<figure>_ci95_high" /
    # "<figure>_median" -> value.
    spread: dict[str, float] = field(default_factory=dict)

    @classmethod
    def figure_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "spread")

    @classmethod
    def kind(cls, name: str) -> str | None:
        """"figure" for a declared figure, "spread" for one's `_std`/`_cv`/interval, None for a name it lacks."""
        known = cls.figure_names()
        if name in known:
            return "figure"
        if any(name.endswith(s) and name.removesuffix(s) in known for s in SPREAD_SUFFIXES):
            return "spread"
        return None

    def add(self, metrics: Mapping[str, float | None]) -> RunReport:
        """Take figures by name (and their spread); an unknown name is an error, not a new metric."""
        for name, value in metrics.items():
            kind = self.kind(name)
            if kind is None:
                raise KeyError(f"{name!r} is not a RunReport figure: declare it in {__name__} first")
            if kind == "figure":
                setattr(self, name, None if value is None else float(value))
            elif value is not None:
                self.spread[name] = float(value)
        return self

    def median(self, name: str) -> float | None:
        """`name`'s median over the measured generations where it was logged (several generations, a compared
        figure), else the figure itself: what a prediction of a typical pass is held against, so that one
        disturbed generation of three does not move it."""
        return self.spread.get(f"{name}{MEDIAN_SUFFIX}", getattr(self, name))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> RunReport:
        """A report from MLflow's flat metrics; names this version does not know (older runs) are left out."""
        return cls().add({n: v for n, v in metrics.items() if cls.kind(n) is not None})

    def items(self) -> Iterator[tuple[str, float]]:
        """(name, value) of every figure that was measured, in declaration order."""
        for name in self.figure_names():
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def metrics(self) -> dict[str, float]:
        """The flat name -> value map MLflow stores: measured figures and their spread, nothing absent."""
        return {**dict(self.items()), **self.spread}
