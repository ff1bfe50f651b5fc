"""One job: build or find the checkpoint, split it, stream it, measure it, log it."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.config import STRATEGY_FAMILIES, Config
from harness.environment import environment_tags
from harness.memory import peak_rss_bytes
from harness.metrics import Timeline, device_clock, inter_token_latencies, token_metrics
from harness.models import ensure_checkpoint
from harness.pipeline import LayerPipeline
from harness.quality import corpus_ids, quality_metrics
from harness.reference import time_transformers_generate
from harness.runner import Generation, LayerStreamingRunner, Sampler
from harness.split import SplitLayout, ensure_split
from harness.tracking import RunTracker, default_tracking_uri, flatten
from harness.vram import VramMonitor
from strategies.cache.disk import DiskCacheConfig
from strategies.compression.none import NoCompressionConfig
from strategies.prefetch.off import PrefetchOffConfig

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device: use device=cpu or device=auto")
    return torch.device(name)


def load_model_config(ckpt_dir: Path) -> LlamaConfig:
    config = LlamaConfig.from_pretrained(ckpt_dir)
    # Pinned rather than left to the default so the runner and the transformers reference
    # run the same attention kernel.
    config._attn_implementation = "sdpa"
    return config


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("workload.chat=true but the checkpoint's tokenizer has no chat template")
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer(prompt)["input_ids"])


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


def build_streamer(cfg: Config, outputs_dir: Path, device: torch.device) -> Streamer:
    ckpt_dir = ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    codec = strategies.build(cfg.compression)
    splits_root = Path(cfg.split.dir) if cfg.split.dir else outputs_dir / "splits"
    layout, stats = ensure_split(ckpt_dir, config, codec, splits_root, verify=cfg.split.verify)
    clock = device_clock(device)
    pipeline = LayerPipeline(
        cache=strategies.build(cfg.cache, layout=layout, device=device),
        codec=codec,
        prefetcher=strategies.build(cfg.prefetch, device=device),
        device=device,
        clock=clock,
    )
    runner = LayerStreamingRunner(
        config, layout.units, pipeline, strategies.build(cfg.kv_cache), device, clock
    )
    split_metrics = {
        "split_s": stats.split_s,
        "split_files_written": float(stats.files_written),
        "split_bytes_written": float(stats.bytes_written),
        "split_largest_file_bytes": float(stats.largest_file_bytes),
        "split_total_bytes": float(sum(r["bytes"] for r in layout.manifest["files"].values())),
    }
    if stats.fresh:
        split_metrics["split_peak_rss_delta_bytes"] = float(stats.peak_rss_delta_bytes)
    return Streamer(ckpt_dir, config, tokenizer, layout, runner, device, split_metrics)


def generate(streamer: Streamer, cfg: Config, keep_logits: bool = False) -> Generation:
    ids = prompt_ids(streamer.tokenizer, cfg.workload.prompt, cfg.workload.chat)
    w = cfg.workload
    sampler = Sampler(w.do_sample, w.temperature, w.top_p, w.seed, streamer.device)
    stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if w.stop_at_eos else []
    return streamer.runner.generate(ids, w.max_new_tokens, sampler, stop, keep_logits=keep_logits)


def run_metrics(streamer: Streamer, gen: Generation) -> dict[str, float]:
    timeline = streamer.runner.timeline
    read_per_pass = timeline.per_pass("read_bytes")
    metrics = token_metrics(gen.start_s, gen.token_times_s)
    metrics.update(streamer.split_metrics)
    metrics.update(
        prompt_tokens=float(len(gen.prompt_ids)),
        passes=float(len(read_per_pass)),
        read_bytes_per_pass=sum(read_per_pass) / len(read_per_pass),
        read_bytes_first_pass=read_per_pass[0],
        cache_bytes_held=float(streamer.runner.pipeline.cache.bytes_held),
        peak_rss_bytes=float(peak_rss_bytes()),
    )
    for stage in ("read_s", "decode_s", "compute_s"):
        metrics[f"time_{stage}"] = sum(timeline.per_pass(stage))
    metrics["split_layer_file_bytes"] = float(streamer.layout.file_bytes(streamer.layout.units[1]))
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
    plain_cfg = replace(cfg, compression=NoCompressionConfig(), cache=DiskCacheConfig(), prefetch=PrefetchOffConfig())
    plain = build_streamer(plain_cfg, outputs_dir, streamer.device)
    return quality_metrics(
        fresh_runner(streamer),
        fresh_runner(plain),
        gen.prompt_ids + gen.generated_ids,
        corpus_ids(streamer.tokenizer, cfg.quality.max_tokens),
    )


def fresh_runner(streamer: Streamer) -> LayerStreamingRunner:
    """A runner on the same pipeline with its own timeline, so extra passes do not count as the run's."""
    r = streamer.runner
    return LayerStreamingRunner(r.config, r.units, r.pipeline, r.kv_policy, r.device, r.clock)


def timeline_csv(timeline: Timeline) -> str:
    rows = timeline.rows()
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
        run_name = " ".join(f"{f}={choices[f]}" for f in ("model", *STRATEGY_FAMILIES) if f in choices)
        tracker.start(
            run_name=run_name or None,
            params={**flatten(resolved), **choices},
            tags={**environment_tags(), "hydra.overrides": " ".join(overrides)},
            parent_run_id=parent_run_id,
        )
    try:
        device = resolve_device(cfg.device)
        with VramMonitor(device, cfg.vram.cap_gib) as vram:
            streamer = build_streamer(cfg, outputs_dir, device)
            gen = generate(streamer, cfg)
        vram.check()
        metrics = run_metrics(streamer, gen)
        metrics.update(vram.metrics())
        if cfg.reference.enabled:
            metrics.update(reference_metrics(streamer, cfg, gen, metrics.get("tpot_s")))
        if cfg.quality.enabled and cfg.compression.name != "none":
            metrics.update(compression_quality(streamer, cfg, gen, outputs_dir))
        text = streamer.tokenizer.decode(gen.generated_ids, skip_special_tokens=True)
        if tracker is not None:
            tracker.log_metrics(metrics)
            tracker.log_series("token_latency_s", inter_token_latencies(gen.token_times_s))
            tracker.log_series("read_bytes", streamer.runner.timeline.per_pass("read_bytes"))
            tracker.log_dict(dict(resolved), "config.yaml")
            tracker.log_dict(
                {"prompt_ids": gen.prompt_ids, "generated_ids": gen.generated_ids, "text": text},
                "generation.json",
            )
            tracker.log_text(timeline_csv(streamer.runner.timeline), "timeline.csv")
            tracker.set_tags(
                {
                    "device": str(device),
                    "split.dir": str(streamer.layout.dir),
                    "split.fresh": str(metrics["split_files_written"] > 0).lower(),
                }
            )
            tracker.end("FINISHED")
    except BaseException as exc:
        if tracker is not None:
            tracker.end("FAILED", reason=f"{type(exc).__name__}: {exc}")
        raise
    print_summary(console, choices, metrics, text)
    return metrics


def print_summary(console: Console, choices: Mapping[str, str], metrics: Mapping[str, float], text: str) -> None:
    table = Table(title="layerbench: " + " ".join(f"{k}={v}" for k, v in choices.items()))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("time to first token", "ttft_s", "{:.3f} s"),
        ("per-token latency (mean)", "tpot_s", "{:.3f} s"),
        ("per-token latency p50 / p90", None, None),
        ("decode throughput", "decode_tokens_per_s", "{:.2f} tok/s"),
        ("new tokens", "new_tokens", "{:.0f}"),
        ("bytes read per pass", "read_bytes_per_pass", "{:,.0f}"),
        ("split", "split_s", "{:.2f} s"),
        ("peak host RSS", "peak_rss_bytes", "{:,.0f} B"),
        ("peak VRAM (allocated)", "peak_vram_allocated_bytes", "{:,.0f} B"),
        ("peak VRAM (NVML)", "peak_vram_nvml_bytes", "{:,.0f} B"),
        ("transformers generate, per token", "reference_tpot_s", "{:.4f} s"),
        ("per-token time vs transformers", "tpot_ratio_vs_reference", "{:.1f}x"),
        ("top-1 agreement vs uncompressed", "quality_top1_agreement", "{:.3f}"),
        ("KL vs uncompressed (mean)", "quality_kl_mean", "{:.4f}"),
        ("perplexity / uncompressed", None, None),
    ]
    for label, key, fmt in rows:
        if key is None:
            if label.startswith("per-token") and "token_latency_p50_s" in metrics:
                table.add_row(label, f"{metrics['token_latency_p50_s']:.3f} / {metrics['token_latency_p90_s']:.3f} s")
            if label.startswith("perplexity") and "quality_ppl" in metrics:
                table.add_row(label, f"{metrics['quality_ppl']:.2f} / {metrics['quality_ppl_reference']:.2f}")
        elif key in metrics:
            table.add_row(label, fmt.format(metrics[key]))
    console.print(table)
    console.print(f"[bold]generated:[/bold] {text!r}")
