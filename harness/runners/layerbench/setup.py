"""A model ready to stream: its split, strategy pipeline and StreamingModel, built from a config's options.

Nothing here names an option: the VRAM pre-check asks the built strategies what they hold
(`Prefetcher.layers_ahead`, `KVCachePolicy.layers_on_device`, `Codec.stored_fraction`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.config import Config
from harness.measurement.metrics import device_clock
from harness.measurement.timeline import StageClock
from harness.measurement.vram import GIB, VramMonitor, check_fits, estimate_need_bytes
from harness.split.layout import SplitLayout
from harness.split.writer import SplitStats, ensure_split
from harness.streaming.graphs import DecodeGraphs
from harness.streaming.model import Generation, Sampler, StreamingModel, forward_decoder
from harness.streaming.pipeline import LayerPipeline
from harness.streaming.speculative import speculative_generate
from harness.workload import Workload, prepare_workload
from strategies.compression.base import Codec
from strategies.kv_cache.base import KVCachePolicy
from strategies.prefetch.base import Prefetcher

if TYPE_CHECKING:
    from harness.runners.layerbench.draft import Draft


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
class Setup:
    """Everything one streamed model needs to generate: its StreamingModel and what built it."""

    ckpt_dir: Path
    config: LlamaConfig
    tokenizer: PreTrainedTokenizerBase
    layout: SplitLayout
    model: StreamingModel
    device: torch.device
    split_stats: SplitStats
    residency: ResidencyPlan
    prompts: list[list[int]]  # the workload's prompt ids, tokenized once (one, or a batch)
    stop: list[int]  # the EOS ids generation stops at (none with workload.stop_at_eos=false)
    draft: Draft | None = None  # decoding=speculative's
    # What the device was planned to hold (the cap was checked against it): the CUDA context, streaming's estimate
    # from the geometry (vram.py), a draft and the resident set.
    planned_device_bytes: int = 0

    @property
    def pipeline(self) -> LayerPipeline:
        return self.model.pipeline

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


def streaming_need(
    cfg: Config, config: LlamaConfig, longest_prompt: int, codec: Codec, prefetcher: Prefetcher,
    kv_policy: KVCachePolicy,
) -> dict[str, int]:
    """From the geometry and what the strategies say they hold: what streaming needs on the device at once
    (`estimate_need_bytes`), the same for a run and for its plan alone."""
    return estimate_need_bytes(
        config,
        stored_fraction=codec.stored_fraction,
        layers_ahead=prefetcher.layers_ahead,
        kv_layers=kv_policy.layers_on_device(config.num_hidden_layers),
        max_seq=longest_prompt + cfg.workload.max_new_tokens,
        batch=cfg.workload.batch_size,
        static_layers=int(cfg.runner.cuda_graph),
        kv_held=kv_policy.held_bytes,
    )


def build_setup(
    cfg: Config, outputs_dir: Path, device: torch.device, vram: VramMonitor | None = None,
    work: Workload | None = None,
) -> Setup:
    """`work`: the job's workload, when the caller has prepared it (`prepare_workload`)."""
    work = work or prepare_workload(cfg, outputs_dir)
    config, tokenizer, prompts = work.config, work.tokenizer, work.prompts
    longest = max(len(p) for p in prompts)
    codec = strategies.build(cfg.compression)
    prefetcher = strategies.build(cfg.prefetch, device=device)
    kv_policy = strategies.build(cfg.kv_cache)
    kv_policy.check(config)  # before the split: a cache the model cannot have is refused by name
    residency = strategies.build(cfg.residency)
    need = streaming_need(cfg, config, longest, codec, prefetcher, kv_policy)
    context_bytes = (vram.context_bytes or 0) if vram is not None else 0
    if vram is not None and vram.enforced:
        check_fits(need, cfg.vram.cap_gib, context_bytes)  # before the split or any weight is read
    splits_root = Path(cfg.split.dir) if cfg.split.dir else outputs_dir / "splits"
    layout, stats = ensure_split(
        work.ckpt_dir, config, codec, splits_root, verify=cfg.split.verify, encode_device=device
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
    if cfg.decoding.drafts:
        from harness.runners.layerbench.draft import build_draft

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
    model = StreamingModel(config, units, pipeline, kv_policy, device, device_clock(device), stages, graphs)
    # What stays and what streams is the plan's to say (plan.py), with the bytes and time it predicts.
    plan = ResidencyPlan(resident, resident_bytes, resident_load_s, residency.active)
    planned = context_bytes + need["total"] + (draft.bytes if draft is not None else 0) + resident_bytes
    return Setup(
        work.ckpt_dir, config, tokenizer, layout, model, device, stats, plan, prompts, work.stop, draft, planned
    )


def generate(
    setup: Setup, cfg: Config, keep_logits: bool = False, on_token: Callable[[int], None] | None = None
) -> Generation:
    prompts, w = setup.prompts, cfg.workload
    sampler = Sampler(w.do_sample, w.temperature, w.top_p, w.seed, setup.device)
    if setup.draft is not None:
        gen, _ = speculative_generate(
            setup.model, setup.draft.model, prompts, w.max_new_tokens, cfg.decoding.k, sampler, setup.stop,
            on_token, verify=cfg.decoding.verify,
        )
        return gen
    return setup.model.generate_batch(
        prompts, w.max_new_tokens, sampler, setup.stop, keep_logits=keep_logits, on_token=on_token
    )


def fresh_model(setup: Setup) -> StreamingModel:
    """A StreamingModel on the same pipeline with its own timeline, so extra passes do not count as the run's."""
    m = setup.model
    return StreamingModel(m.config, m.units, m.pipeline, m.kv_policy, m.device, m.clock, m.stages)
