"""A model ready to stream: its checkpoint, split and runner, built from a config's strategy choices.

The job never names an option: the VRAM pre-check asks the built strategies what they hold
(`Prefetcher.layers_ahead`, `KVCachePolicy.layers_on_device`, `Codec.stored_fraction`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.config import Config, WorkloadConfig
from harness.measurement.metrics import device_clock
from harness.measurement.timeline import StageClock
from harness.measurement.vram import VramMonitor, check_fits, estimate_need_bytes
from harness.runner.pipeline import LayerPipeline
from harness.runner.streaming import Generation, LayerStreamingRunner, Sampler
from harness.split.layout import SplitLayout
from harness.split.writer import SplitStats, ensure_split


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


def check_context(prompt_tokens: int, max_new_tokens: int, config: LlamaConfig, model_name: str) -> None:
    """Refuse a workload longer than the model's positions, before any weight is read: past them RoPE
    extrapolates and the output is garbage, which a run would log as FINISHED."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({prompt_tokens} tokens) plus workload.max_new_tokens={max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} positions, over model {model_name!r}'s maximum of {limit} "
            f"(max_position_embeddings): shorten the prompt or set workload.max_new_tokens <= "
            f"{max(limit - prompt_tokens, 0)}"
        )


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
    split_stats: SplitStats

    @property
    def pipeline(self) -> LayerPipeline:
        return self.runner.pipeline

    def split_metrics(self) -> dict[str, float]:
        stats = self.split_stats
        metrics = {
            "split_s": stats.split_s,
            "split_files_written": float(stats.files_written),
            "split_bytes_written": float(stats.bytes_written),
            "split_largest_file_bytes": float(stats.largest_file_bytes),
            "split_total_bytes": float(sum(r["bytes"] for r in self.layout.manifest["files"].values())),
            "split_layer_file_bytes": float(self.layout.file_bytes(self.layout.units[1])),
        }
        if stats.fresh:
            metrics["split_peak_anon_delta_bytes"] = float(stats.peak_anon_delta_bytes)
        return metrics


def build_streamer(
    cfg: Config, outputs_dir: Path, device: torch.device, vram: VramMonitor | None = None
) -> Streamer:
    ckpt_dir = ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    ids = prompt_ids(tokenizer, cfg.workload)
    check_context(len(ids), cfg.workload.max_new_tokens, config, cfg.model.name)
    codec = strategies.build(cfg.compression)
    prefetcher = strategies.build(cfg.prefetch, device=device)
    kv_policy = strategies.build(cfg.kv_cache)
    if vram is not None and vram.enforced:
        # From the geometry and what the strategies say they hold: refuse before the split or any weight is read.
        need = estimate_need_bytes(
            config,
            stored_fraction=codec.stored_fraction,
            layers_ahead=prefetcher.layers_ahead,
            kv_layers=kv_policy.layers_on_device(config.num_hidden_layers),
            max_seq=len(ids) + cfg.workload.max_new_tokens,
        )
        check_fits(need, cfg.vram.cap_gib, vram.context_bytes or 0)
    splits_root = Path(cfg.split.dir) if cfg.split.dir else outputs_dir / "splits"
    layout, stats = ensure_split(
        ckpt_dir, config, codec, splits_root, verify=cfg.split.verify, encode_device=device
    )
    stages = StageClock(device)
    pipeline = LayerPipeline(
        cache=strategies.build(cfg.cache, files=layout, device=device),
        codec=codec,
        prefetcher=prefetcher,
        device=device,
        clock=stages,
    )
    runner = LayerStreamingRunner(config, layout.units, pipeline, kv_policy, device, device_clock(device), stages)
    return Streamer(ckpt_dir, config, tokenizer, layout, runner, device, stats)


def generate(
    streamer: Streamer, cfg: Config, keep_logits: bool = False, on_token: Callable[[int], None] | None = None
) -> Generation:
    ids = prompt_ids(streamer.tokenizer, cfg.workload)
    w = cfg.workload
    sampler = Sampler(w.do_sample, w.temperature, w.top_p, w.seed, streamer.device)
    stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if w.stop_at_eos else []
    return streamer.runner.generate(ids, w.max_new_tokens, sampler, stop, keep_logits=keep_logits, on_token=on_token)


def fresh_runner(streamer: Streamer) -> LayerStreamingRunner:
    """A runner on the same pipeline with its own timeline, so extra passes do not count as the run's."""
    r = streamer.runner
    return LayerStreamingRunner(r.config, r.units, r.pipeline, r.kv_policy, r.device, r.clock, r.stages)
