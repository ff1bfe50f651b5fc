"""A model ready to stream: its checkpoint, split and runner, built from a config's strategy choices.

The job never names an option: the VRAM pre-check asks the built strategies what they hold
(`Prefetcher.layers_ahead`, `KVCachePolicy.layers_on_device`, `Codec.stored_fraction`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.tokenizer import CORPUS_PATH
from harness.config import Config, WorkloadConfig
from harness.measurement.metrics import device_clock
from harness.measurement.timeline import StageClock
from harness.measurement.vram import GIB, VramMonitor, check_fits, estimate_need_bytes
from harness.split.layout import SplitLayout
from harness.split.writer import SplitStats, ensure_split
from harness.streaming.graphs import DecodeGraphs
from harness.streaming.model import Generation, Sampler, StreamingModel, forward_decoder
from harness.streaming.pipeline import LayerPipeline
from harness.streaming.speculative import speculative_generate

if TYPE_CHECKING:
    from harness.job.draft import Draft


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


# The prompt length a batch cut from the shipped text gets when workload.prompt_tokens is not set.
BATCH_PROMPT_TOKENS = 16


def batch_prompt_ids(tokenizer: PreTrainedTokenizerBase, workload: WorkloadConfig) -> list[list[int]]:
    """The prompts of one generation: `workload.prompt` alone, or a batch of `workload.batch_size`."""
    if workload.batch_size == 1:
        return [prompt_ids(tokenizer, workload)]
    if workload.prompts:
        return [prompt_ids(tokenizer, replace(workload, prompt=p)) for p in workload.prompts[: workload.batch_size]]
    length = workload.prompt_tokens or BATCH_PROMPT_TOKENS
    text = list(tokenizer(CORPUS_PATH.read_text(), add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    if len(text) < body * workload.batch_size:
        raise ValueError(
            f"the shipped text holds {len(text)} tokens, too few for workload.batch_size={workload.batch_size} "
            f"prompts of {length}: give workload.prompts or a smaller batch"
        )
    return [bos + text[i * body : (i + 1) * body] for i in range(workload.batch_size)]


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
class ResidencyPlan:
    """The units kept on the device for the whole run (residency), what they take, and how long they took to load."""

    units: list[str]
    bytes: int
    load_s: float
    active: bool  # the policy may keep units (residency=auto); without it there are no figures to log

    def metrics(self, num_layers: int) -> dict[str, float]:
        if not self.active:
            return {}
        layers = sum(unit.startswith("layers.") for unit in self.units)
        return {
            "resident_layers": float(layers),
            "resident_bytes": float(self.bytes),
            "resident_load_s": self.load_s,
            "streamed_layers": float(num_layers - layers),
        }


@dataclass
class Streamer:
    """Everything one model needs to generate: the runner and what built it."""

    ckpt_dir: Path
    config: LlamaConfig
    tokenizer: PreTrainedTokenizerBase
    layout: SplitLayout
    runner: StreamingModel
    device: torch.device
    split_stats: SplitStats
    residency: ResidencyPlan
    prompts: list[list[int]]  # the workload's prompt ids, tokenized once (one, or a batch)
    draft: Draft | None = None  # decoding=speculative's
    # What the device was planned to hold (the cap was checked against it): the CUDA context, streaming's estimate
    # from the geometry (vram.py), a draft and the resident set.
    planned_device_bytes: int = 0

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
    cfg: Config, outputs_dir: Path, device: torch.device, vram: VramMonitor | None = None,
    ckpt_dir: Path | None = None,
) -> Streamer:
    """`ckpt_dir`: the model's checkpoint, when the caller already made sure of it (`ensure_checkpoint`)."""
    ckpt_dir = ckpt_dir or ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    prompts = batch_prompt_ids(tokenizer, cfg.workload)
    longest = max(len(p) for p in prompts)
    check_context(longest, cfg.workload.max_new_tokens, config, cfg.model.name)
    codec = strategies.build(cfg.compression)
    prefetcher = strategies.build(cfg.prefetch, device=device)
    kv_policy = strategies.build(cfg.kv_cache)
    residency = strategies.build(cfg.residency)
    # From the geometry and what the strategies say they hold: what streaming needs on the device at once.
    need = estimate_need_bytes(
        config,
        stored_fraction=codec.stored_fraction,
        layers_ahead=prefetcher.layers_ahead,
        kv_layers=kv_policy.layers_on_device(config.num_hidden_layers),
        max_seq=longest + cfg.workload.max_new_tokens,
        batch=cfg.workload.batch_size,
        static_layers=int(cfg.runner.cuda_graph),
    )
    context_bytes = (vram.context_bytes or 0) if vram is not None else 0
    if vram is not None and vram.enforced:
        check_fits(need, cfg.vram.cap_gib, context_bytes)  # before the split or any weight is read
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
    # What the cap leaves beside streaming (on a CPU the same budget, of host memory): the resident set's room.
    budget = int(cfg.vram.cap_gib * GIB) - context_bytes - need["total"]
    draft = None
    if cfg.decoding.name == "speculative":
        from harness.job.draft import build_draft

        # The draft stays whole on the device: its room comes first, the resident layers get what is left.
        draft = build_draft(cfg, outputs_dir, splits_root, device, tokenizer, budget)
        budget -= draft.bytes
    units = layout.units
    resident = residency.choose(
        units[1:-2], ["norm", "lm_head", "embed"], {u: layout.file_bytes(u) for u in units}, budget
    )
    start = time.perf_counter()
    resident_bytes = pipeline.keep_resident(layout, resident)
    resident_load_s = time.perf_counter() - start
    graphs = DecodeGraphs(forward_decoder) if cfg.runner.cuda_graph else None
    runner = StreamingModel(config, units, pipeline, kv_policy, device, device_clock(device), stages, graphs)
    # What stays and what streams is the plan's to say (harness.job.plan), with the bytes and time it predicts.
    plan = ResidencyPlan(resident, resident_bytes, resident_load_s, residency.active)
    planned = context_bytes + need["total"] + (draft.bytes if draft is not None else 0) + resident_bytes
    return Streamer(ckpt_dir, config, tokenizer, layout, runner, device, stats, plan, prompts, draft, planned)


def generate(
    streamer: Streamer, cfg: Config, keep_logits: bool = False, on_token: Callable[[int], None] | None = None
) -> Generation:
    prompts = streamer.prompts
    w = cfg.workload
    stop = eos_ids(streamer.config, streamer.tokenizer, streamer.ckpt_dir) if w.stop_at_eos else []
    if streamer.draft is not None:
        gen, _ = speculative_generate(
            streamer.runner, streamer.draft.runner, prompts[0], w.max_new_tokens, cfg.decoding.k, stop, on_token
        )
        return gen
    sampler = Sampler(w.do_sample, w.temperature, w.top_p, w.seed, streamer.device)
    return streamer.runner.generate_batch(
        prompts, w.max_new_tokens, sampler, stop, keep_logits=keep_logits, on_token=on_token
    )


def fresh_runner(streamer: Streamer) -> StreamingModel:
    """A runner on the same pipeline with its own timeline, so extra passes do not count as the run's."""
    r = streamer.runner
    return StreamingModel(r.config, r.units, r.pipeline, r.kv_policy, r.device, r.clock, r.stages)
