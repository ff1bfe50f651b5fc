"""One job: build or find the checkpoint, split it, stream it, measure it, log it."""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.config import Config, WorkloadConfig
from harness.device import resolve_device
from harness.job.quality import corpus_ids, quality_metrics
from harness.job.reference import time_transformers_generate
from harness.measurement.environment import environment_tags
from harness.measurement.memory import peak_rss_bytes
from harness.measurement.metrics import aggregate, device_clock, inter_token_latencies, token_metrics
from harness.measurement.plots import plot_pass, plot_token_latency
from harness.measurement.summary import print_summary
from harness.measurement.timeline import CROSSCHECK_TOLERANCE, StageClock, per_pass, stage_metrics
from harness.measurement.vram import VramMonitor, check_fits, estimate_need_bytes
from harness.probe.probe import LINKS, load_or_measure, load_or_measure_layer_compute_s, token_floor
from harness.runner.pipeline import LayerPipeline
from harness.runner.streaming import Generation, LayerStreamingRunner, Sampler
from harness.split.layout import SplitLayout
from harness.split.writer import ensure_split
from harness.tracking.tracking import RunTracker, default_tracking_uri, flatten

log = logging.getLogger(__name__)


def load_model_config(ckpt_dir: Path) -> LlamaConfig:
    config = LlamaConfig.from_pretrained(ckpt_dir)
    # Pinned rather than left to the default so the runner and the transformers reference
    # run the same attention kernel.
    config._attn_implementation = "sdpa"
    return config


def prompt_ids(tokenizer: PreTrainedTokenizerBase, workload: WorkloadConfig) -> list[int]:
    prompt = workload.prompt
    if workload.chat:
        if not tokenizer.chat_template:
            raise ValueError("workload.chat=true but the checkpoint's tokenizer has no chat template")
        ids = list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    if workload.prompt_tokens is not None:
        # A fixed prompt length (the write-up's "8 prompt tokens") whatever the tokenizer: repeat, then cut.
        more = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        while len(ids) < workload.prompt_tokens:
            ids += more
        ids = ids[: workload.prompt_tokens]
    return ids


def eos_ids(config: LlamaConfig, tokenizer: PreTrainedTokenizerBase, ckpt_dir: Path) -> list[int]:
    """EOS ids from generation_config.json (Llama-3-Instruct lists several), else config/tokenizer."""
    ids: Any = None
    gen_path = ckpt_dir / "generation_config.json"
    if gen_path.exists():
        ids = json.loads(gen_path.read_text()).get("eos_token_id")
    if ids is None:
        ids = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


@dataclass
class Streamer:
    """Everything one model needs to generate: the runner and what built it."""

    ckpt_dir: Path
    config: LlamaConfig
    tokenizer: PreTrainedTokenizerBase
    layout: SplitLayout
    runner: LayerStreamingRunner
    device: torch.device
    split_metrics: dict[str, float]


def build_streamer(
    cfg: Config, outputs_dir: Path, device: torch.device, vram: VramMonitor | None = None
) -> Streamer:
    ckpt_dir = ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    codec = strategies.build(cfg.compression)
    if vram is not None and vram.enforced:
        # From the geometry alone: refuse before the split or any weight is read.
        need = estimate_need_bytes(
            config,
            stored_fraction=codec.stored_fraction,
            prefetch_depth=getattr(cfg.prefetch, "depth", 0),
            kv_on_device=cfg.kv_cache.name == "device",
            max_seq=len(prompt_ids(tokenizer, cfg.workload)) + cfg.workload.max_new_tokens,
        )
        check_fits(need, cfg.vram.cap_gib, vram.context_bytes or 0)
    splits_root = Path(cfg.split.dir) if cfg.split.dir else outputs_dir / "splits"
    layout, stats = ensure_split(ckpt_dir, config, codec, splits_root, verify=cfg.split.verify)
    stages = StageClock(device)
    pipeline = LayerPipeline(
        cache=strategies.build(cfg.cache, files=layout, device=device),
        codec=codec,
        prefetcher=strategies.build(cfg.prefetch, device=device),
        device=device,
        clock=stages,
    )
    runner = LayerStreamingRunner(
        config, layout.units, pipeline, strategies.build(cfg.kv_cache), device, device_clock(device), stages
    )
    split_metrics = {
        "split_s": stats.split_s,
        "split_files_written": float(stats.files_written),
        "split_bytes_written": float(stats.bytes_written),
        "split_largest_file_bytes": float(stats.largest_file_bytes),
        "split_total_bytes": float(sum(r["bytes"] for r in layout.manifest["files"].values())),
    }
    if stats.fresh:
        split_metrics["split_peak_anon_delta_bytes"] = float(stats.peak_anon_delta_bytes)
    return Streamer(ckpt_dir, config, tokenizer, layout, runner, device, split_metrics)


def generate(
    streamer: Streamer, cfg: Config, keep_logits: bool = False, on_token: Callable[[int], None] | None = None
) -> Generation:
    ids = prompt_ids(streamer.tokenizer, cfg.workload)
    w = cfg.workload
    sampler = Sampler(w.do_sample, w.temperature, w.top_p, w.seed, streamer.device)
    stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if w.stop_at_eos else []
    return streamer.runner.generate(ids, w.max_new_tokens, sampler, stop, keep_logits=keep_logits, on_token=on_token)


def generation_metrics(streamer: Streamer, gen: Generation) -> dict[str, float]:
    """Everything one generation measured: token timing, bytes per pass, stage shares and the cross-check."""
    rows = gen.timeline.rows(streamer.runner.stages)
    read_per_pass = per_pass(rows, "read_bytes")
    metrics = token_metrics(gen.start_s, gen.token_times_s)
    metrics.update(
        prompt_tokens=float(len(gen.prompt_ids)),
        passes=float(len(read_per_pass)),
        read_bytes_per_pass=sum(read_per_pass) / len(read_per_pass),
        read_bytes_first_pass=read_per_pass[0],
        h2d_bytes_per_pass=sum(per_pass(rows, "h2d_bytes")) / len(read_per_pass),
        decode_bytes_per_pass=sum(per_pass(rows, "decode_bytes")) / len(read_per_pass),
    )
    overlapped = streamer.runner.pipeline.prefetcher.cfg.name != "off"
    metrics.update(stage_metrics(rows, gen.timeline.pass_walls(streamer.runner.stages), overlapped))
    if gen.kv_cache_bytes is not None and gen.kv_cache_tokens:
        metrics["kv_cache_bytes"] = float(gen.kv_cache_bytes)
        metrics["kv_bytes_per_token"] = gen.kv_cache_bytes / gen.kv_cache_tokens
    return metrics


def reference_metrics(streamer: Streamer, cfg: Config, gen: Generation, tpot_s: float | None) -> dict[str, float]:
    """transformers' resident generate on the same checkpoint and prompt, timed the same way."""
    stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if cfg.workload.stop_at_eos else []
    ref_ids, metrics = time_transformers_generate(
        streamer.ckpt_dir, gen.prompt_ids, cfg.workload.max_new_tokens, stop, streamer.device, streamer.runner.clock
    )
    metrics["reference_tokens_match"] = float(ref_ids == gen.generated_ids)
    if tpot_s is not None and metrics.get("reference_tpot_s"):
        metrics["tpot_ratio_vs_reference"] = tpot_s / metrics["reference_tpot_s"]
    return metrics


def compression_quality(streamer: Streamer, cfg: Config, gen: Generation, outputs_dir: Path) -> dict[str, float]:
    """The codec's cost in accuracy: the same runner over the uncompressed split of the same checkpoint."""
    plain = build_streamer(cfg.uncompressed(), outputs_dir, streamer.device)
    return quality_metrics(
        fresh_runner(streamer),
        fresh_runner(plain),
        gen.prompt_ids + gen.generated_ids,
        corpus_ids(streamer.tokenizer, cfg.quality.max_tokens),
    )


def floor_metrics(streamer: Streamer, cfg: Config, metrics: Mapping[str, float], outputs_dir: Path) -> dict[str, float]:
    """The per-token floor from the measured links and one layer's compute, and how far the run is from it."""
    rates = load_or_measure(
        streamer.device, outputs_dir / "probe", outputs_dir / "probe", refresh=cfg.probe.refresh,
        size_bytes=cfg.probe.size_mib << 20,
    )
    # Without a KV cache every pass recomputes the whole sequence: time a layer at the mean pass length.
    seq_len = 1 if cfg.kv_cache.name != "none" else int(metrics["prompt_tokens"] + metrics["new_tokens"] / 2)
    layer_s = load_or_measure_layer_compute_s(
        streamer.config, streamer.device, streamer.config.dtype, outputs_dir / "probe", seq_len, cfg.probe.refresh
    )
    compressed = cfg.compression.name != "none"
    floor = token_floor(
        disk_bytes=metrics["read_bytes_per_pass"],
        host_bytes=0.0,  # cached host copies are read in place; their cost shows as H2D or compute
        h2d_bytes=metrics["h2d_bytes_per_pass"],
        dequant_bytes=metrics["decode_bytes_per_pass"] if compressed else 0.0,
        dequant_codec=cfg.compression.name if compressed else None,
        compute_s=layer_s * streamer.config.num_hidden_layers,
        rates=rates,
        page_cache=cfg.cache.page_cache,
    )
    out = {"floor_s": floor.floor_s, "layer_compute_s": layer_s}
    out.update({f"floor_{link}_s": seconds for link, seconds in floor.per_link_s.items()})
    if "tpot_s" in metrics and floor.floor_s > 0:
        out["floor_ratio"] = metrics["tpot_s"] / floor.floor_s
    out.update({f"link_{k}": float(v) for k, v in vars(rates).items() if isinstance(v, float)})
    return out


def fresh_runner(streamer: Streamer) -> LayerStreamingRunner:
    """A runner on the same pipeline with its own timeline, so extra passes do not count as the run's."""
    r = streamer.runner
    return LayerStreamingRunner(r.config, r.units, r.pipeline, r.kv_policy, r.device, r.clock, r.stages)


def rows_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["pass_index"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def run_job(
    cfg: Config,
    resolved: Mapping[str, Any],
    *,
    choices: Mapping[str, str],
    overrides: list[str],
    parent_run_id: str | None = None,
    console: Console | None = None,
) -> dict[str, float]:
    """Run one configuration end to end; the MLflow run ends FAILED with the reason if anything raises."""
    console = console or Console()
    outputs_dir = Path(cfg.paths.outputs).resolve()
    tracker = None
    if cfg.tracking.enabled:
        tracker = RunTracker(cfg.tracking.uri or default_tracking_uri(outputs_dir), cfg.tracking.experiment)
        run_name = " ".join(f"{f}={choices[f]}" for f in ("model", *strategies.FAMILIES) if f in choices)
        tracker.start(
            run_name=run_name or None,
            params={**flatten(resolved), **choices},
            tags={**environment_tags(), "hydra.overrides": " ".join(overrides)},
            parent_run_id=parent_run_id,
        )
    try:
        device = resolve_device(cfg.device)
        with VramMonitor(device, cfg.vram.cap_gib) as vram:
            streamer = build_streamer(cfg, outputs_dir, device, vram)
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("generate", total=cfg.workload.max_new_tokens * cfg.bench.warmup)
                for _ in range(cfg.bench.warmup):
                    generate(streamer, cfg, on_token=lambda _: progress.advance(task))
                gens = []
                for repeat in range(cfg.bench.repeats):
                    progress.reset(task, total=cfg.workload.max_new_tokens, description=f"generate {repeat + 1}")
                    gens.append(generate(streamer, cfg, on_token=lambda _: progress.advance(task)))
        vram.check()
        gen = gens[-1]
        metrics = aggregate([generation_metrics(streamer, g) for g in gens])
        metrics.update(streamer.split_metrics)
        metrics.update(vram.metrics())
        metrics.update(
            peak_rss_bytes=float(peak_rss_bytes()),
            cache_bytes_held=float(streamer.runner.pipeline.cache.bytes_held),
            split_layer_file_bytes=float(streamer.layout.file_bytes(streamer.layout.units[1])),
        )
        if cfg.probe.enabled:
            metrics.update(floor_metrics(streamer, cfg, metrics, outputs_dir))
        if cfg.reference.enabled:
            metrics.update(reference_metrics(streamer, cfg, gen, metrics.get("tpot_s")))
        if cfg.quality.enabled and cfg.compression.name != "none":
            metrics.update(compression_quality(streamer, cfg, gen, outputs_dir))
        text = streamer.tokenizer.decode(gen.generated_ids, skip_special_tokens=True)
        if tracker is not None:
            log_run(tracker, cfg, resolved, streamer, gen, metrics, text)
            tracker.end("FINISHED")
    except BaseException as exc:
        if tracker is not None:
            tracker.end("FAILED", reason=f"{type(exc).__name__}: {exc}")
        raise
    print_summary(console, choices, metrics, text)
    return metrics


def log_run(
    tracker: RunTracker,
    cfg: Config,
    resolved: Mapping[str, Any],
    streamer: Streamer,
    gen: Generation,
    metrics: dict[str, float],
    text: str,
) -> None:
    """Metrics, step series, tags and artifacts of a finished job (timeline and plots: its last repeat)."""
    rows = gen.timeline.rows(streamer.runner.stages)
    latencies = inter_token_latencies(gen.token_times_s)
    tracker.log_metrics(metrics)
    tracker.log_series("token_latency_s", latencies)
    tracker.log_series("read_bytes", per_pass(rows, "read_bytes"))
    tracker.log_dict(dict(resolved), "config.yaml")
    generation = {"prompt_ids": gen.prompt_ids, "generated_ids": gen.generated_ids, "text": text}
    tracker.log_dict(generation, "generation.json")
    tracker.log_text(rows_csv(rows), "timeline.csv")
    tags = {
        "device": str(streamer.device),
        "split.dir": str(streamer.layout.dir),
        "split.fresh": str(metrics["split_files_written"] > 0).lower(),
        "cache.page_cache": cfg.cache.page_cache,
    }
    if "floor_s" in metrics:
        tags["floor.limiting"] = max(LINKS, key=lambda link: metrics[f"floor_{link}_s"])
    residual = metrics.get("crosscheck_residual")
    if residual is not None and residual > CROSSCHECK_TOLERANCE:
        tags["warning.crosscheck"] = (
            f"stage times of a pass differ from its wall time by {residual:.1%} (> {CROSSCHECK_TOLERANCE:.0%})"
        )
        log.warning(tags["warning.crosscheck"])
    tracker.set_tags(tags)
    with tempfile.TemporaryDirectory() as tmp:
        title = streamer.ckpt_dir.name
        decode_pass = len(gen.token_times_s) // 2  # a decode pass from the middle: no prefill, no warm-up edge
        plot_pass(rows, decode_pass, Path(tmp) / "timeline_pass.png", f"{title}: pass {decode_pass}")
        tracker.log_artifact(Path(tmp) / "timeline_pass.png")
        if latencies:
            plot_token_latency(latencies, Path(tmp) / "token_latency.png", f"{title}: per-token latency")
            tracker.log_artifact(Path(tmp) / "token_latency.png")
