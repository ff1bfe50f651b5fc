"""`plan.only=true`: the streamed run's plan, predicted from the geometry and the codec, with nothing built.

No checkpoint weights are generated, no split is written, no model is loaded and no MLflow run is opened: each
unit's stored size comes from harness/split/sizes.py, and the plan is made by the very code a run uses
(`make_plan` on a Setup whose split layout is that prediction; the residency policy's `choose`; the VRAM estimate
`estimate_need_bytes` and its check). The link probe and the compute of one decoder layer and of the head are
measured (or read from the probe's cache) on this machine, as a run's plan does; writing the probe's cache is the
only lasting effect.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

import strategies
from harness.checkpoints.generated import generated_dir, llama_config_for, splits_directly, weights_bytes
from harness.checkpoints.loading import load_model_config
from harness.checkpoints.tokenizer import build_tokenizer
from harness.config import Config
from harness.device import resolve_device
from harness.measurement.metrics import device_clock
from harness.measurement.timeline import StageClock
from harness.measurement.vram import GIB, VramCapExceeded, VramMonitor, check_fits
from harness.runners.layerbench.plan import Plan, make_plan
from harness.runners.layerbench.setup import ResidencyPlan, Setup, streaming_need
from harness.split.direct import direct_split_conflicts, uncompressed_refusal
from harness.split.layout import SplitLayout
from harness.split.sizes import predicted_manifest
from harness.split.writer import SplitStats
from harness.streaming.model import StreamingModel
from harness.streaming.pipeline import LayerPipeline
from harness.workload import batch_prompt_ids, check_context

GB = 1e9


class PlanRefused(ValueError):
    """The configuration cannot run as planned (over the cap, a split that cannot exist); the message says why,
    with the numbers."""


def planned_model(cfg: Config, outputs_dir: Path) -> tuple[LlamaConfig, PreTrainedTokenizerBase, Path]:
    """The model's config and tokenizer, and where its checkpoint is (or would be), reading no weight and building
    nothing: a generated model's config comes from its geometry when its checkpoint does not exist yet."""
    model = cfg.model
    if model.source == "generated":
        ckpt_dir = generated_dir(model, outputs_dir)
        if not (ckpt_dir / "config.json").is_file():
            tokenizer = build_tokenizer()
            config = llama_config_for(model, len(tokenizer))
            config._attn_implementation = "sdpa"  # as load_model_config pins it for the runner
            return config, tokenizer, ckpt_dir
    elif model.source == "local":
        from harness.checkpoints.local import validate_local

        ckpt_dir = validate_local(Path(model.path).expanduser())
    else:
        from harness.checkpoints.gguf import _key, gguf_path

        path = gguf_path(model)
        ckpt_dir = outputs_dir / "models" / f"{model.name}-{_key(model, path)}"
        if not (ckpt_dir / "config.json").is_file():
            raise PlanRefused(
                f"plan.only reads model {model.name}'s config from its converted checkpoint, which does not exist "
                f"yet: run it once without plan.only to convert {path.name}"
            )
    return load_model_config(ckpt_dir), AutoTokenizer.from_pretrained(ckpt_dir), ckpt_dir


def _context_bytes(cfg: Config, device: torch.device) -> int:
    """The CUDA context's device memory, as a run's VRAM monitor measures it (0 on a CPU)."""
    with VramMonitor.from_config(device, cfg.vram) as vram:
        return vram.context_bytes or 0


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would: its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def predict(cfg: Config, outputs_dir: Path) -> tuple[Setup, dict[str, Any]]:
    """A Setup for `make_plan` whose split layout is predicted and whose resident set is chosen from those
    predicted sizes, and the figures beside it (the VRAM estimate, the split's size, what a run would refuse).
    Raises PlanRefused when the configuration cannot fit the cap or its split cannot exist."""
    if cfg.runner.name != "layerbench":
        raise PlanRefused(f"plan.only plans layerbench's streamed run: runner={cfg.runner.name} has no plan")
    if cfg.decoding.drafts:
        raise PlanRefused("plan.only plans greedy decoding: a speculative run's plan is printed when it runs")
    device = resolve_device(cfg.device)
    config, tokenizer, ckpt_dir = planned_model(cfg, outputs_dir)
    prompts = batch_prompt_ids(tokenizer, cfg.workload)
    check_context(max(len(p) for p in prompts), cfg.workload.max_new_tokens, config, cfg.model.name)
    direct = splits_directly(cfg.model)
    refused = direct_split_conflicts(cfg, config) if direct else []
    if direct and cfg.compression.bits is None:
        raise PlanRefused(uncompressed_refusal(cfg.model.name, config, cfg.compression.name))

    codec = strategies.build(cfg.compression)
    prefetcher = strategies.build(cfg.prefetch, device=device)
    kv_policy = strategies.build(cfg.kv_cache)
    kv_policy.check(config)
    residency = strategies.build(cfg.residency)
    # What build_setup checks the cap against, from the same estimate.
    need = streaming_need(cfg, config, max(len(p) for p in prompts), codec, prefetcher, kv_policy)
    context = _context_bytes(cfg, device)
    splits_root = Path(cfg.split.dir) if cfg.split.dir else outputs_dir / "splits"
    layout = SplitLayout(splits_root / "predicted" / codec.split_key, predicted_manifest(config, codec))
    figures = {
        "need": need, "context": context, "direct": direct, "refused": refused,
        "weights_bytes": weights_bytes(config), "split_bytes": layout.files_bytes(layout.units),
        "split_key": codec.split_key, "splits_root": splits_root, "free_bytes": _free_bytes(splits_root),
    }
    try:
        check_fits(need, cfg.vram.cap_gib, context)
    except VramCapExceeded as exc:
        raise PlanRefused(f"does not fit: {exc}") from None
    budget = int(cfg.vram.cap_gib * GIB) - context - need["total"]
    units = layout.units
    try:
        resident = residency.choose(
            units[1:-2], ["norm", "lm_head", "embed"], {u: layout.file_bytes(u) for u in units}, budget
        )
    except ValueError as exc:
        raise PlanRefused(f"does not fit: {exc}") from None
    # What keep_resident would hold: the resident files' tensors (a shared file once), without their headers.
    resident_bytes = sum({layout.file(u): layout.record(u)["data_bytes"] for u in resident}.values())

    stages = StageClock(device)
    pipeline = LayerPipeline(
        cache=strategies.build(cfg.cache, files=layout, device=device), codec=codec, prefetcher=prefetcher,
        device=device, clock=stages,
    )
    # Marked resident, not loaded: the plan asks only which units stay (an embedding kept is not looked up).
    pipeline.resident = {u: {} for u in resident}
    model = StreamingModel(config, units, pipeline, kv_policy, device, device_clock(device), stages)
    setup = Setup(
        ckpt_dir, config, tokenizer, layout, model, device, SplitStats(0.0, False, 0, 0, 0, 0),
        ResidencyPlan(resident, resident_bytes, 0.0, residency.active), prompts, [],
        planned_device_bytes=context + need["total"] + resident_bytes,
    )
    return setup, figures


def plan_text(cfg: Config, setup: Setup, plan: Plan | None, figures: dict[str, Any]) -> list[str]:
    """The plan's lines: the model and its split, the device memory under the cap, what stays and what streams,
    the predicted per-token time, and `bytes per pass: <N> GB` on a line of its own."""
    config, layout, need = setup.config, setup.layout, figures["need"]
    layers = config.num_hidden_layers
    resident = setup.residency.units
    resident_layers = [u for u in resident if u.startswith("layers.")]
    streamed = [u for u in layout.units if u not in resident]
    streamed_layers = sum(u.startswith("layers.") for u in streamed)
    weights = f"{figures['weights_bytes'] / GB:.1f} GB of {str(config.dtype).removeprefix('torch.')} weights"
    source = "generated straight into each split" if figures["direct"] else "in its checkpoint"
    total = figures["context"] + need["total"] + setup.residency.bytes
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if k != "total")
    lines = [
        "plan (plan.only: predicted from the geometry and the codec; no weight generated, no split written, no run)",
        f"  model {cfg.model.name}: {layers} decoder layers, hidden size {config.hidden_size}; {weights}, {source}",
        f"  split {figures['split_key']}: {len(layout.manifest['files'])} files, {figures['split_bytes'] / GB:.2f} GB "
        f"(a decoder layer {layout.file_bytes(layout.units[1]) / 1e6:.1f} MB)",
        f"  device {setup.device}, vram.cap_gib={cfg.vram.cap_gib}: streaming needs {_gib(need['total'])} ({parts}), "
        + (f"the CUDA context {_gib(figures['context'])}, " if setup.device.type == "cuda" else "")
        + f"the resident units {_gib(setup.residency.bytes)}: {_gib(total)} in all, fits",
        f"  resident: {len(resident_layers)} of {layers} decoder layers"
        + (f" ({' '.join(resident)})" if resident else "")
        + f", {setup.residency.bytes / GB:.2f} GB",
        f"  streamed each pass: {len(streamed)} units ({streamed_layers} decoder layers"
        + "".join(f", {u}" for u in streamed if not u.startswith("layers.")) + ")",
    ]
    if plan is None:
        lines.append("  predicted per token: not predicted (probe.enabled=false)")
    else:
        links = ", ".join(f"{link} {seconds:.3g} s" for link, seconds in plan.per_link_s.items() if seconds)
        lines.append(
            f"  predicted per token: {plan.predicted_s:.3g} s (limited by {plan.limiting}; {links}), from this "
            f"machine's probe on {setup.device}"
        )
    per_pass = plan.stream_bytes_per_pass if plan is not None else layout.files_bytes(streamed)
    lines.append(f"bytes per pass: {per_pass / GB:.4g} GB")
    if plan is not None:
        lines.append(f"plan: {plan.describe(setup.residency.bytes)}")
    lines += [f"note: a run of this configuration is refused: {problem}" for problem in figures["refused"]]
    if figures["split_bytes"] > figures["free_bytes"]:
        lines.append(
            f"note: the split takes {figures['split_bytes'] / GB:.1f} GB, but {figures['free_bytes'] / GB:.1f} GB are "
            f"free where it goes ({figures['splits_root']}), unless it is there already: set split.dir to a disk "
            "with room"
        )
    return lines


def print_plan(cfg: Config) -> None:
    """Print the plan of `cfg`'s streamed run and return; raises PlanRefused, saying why with the numbers, when it
    cannot run (over vram.cap_gib, or a split that cannot exist)."""
    outputs_dir = Path(cfg.paths.outputs).resolve()
    setup, figures = predict(cfg, outputs_dir)
    plan = None
    if cfg.probe.enabled:
        plan = make_plan(setup, cfg, outputs_dir / "probe")
    print("\n".join(plan_text(cfg, setup, plan, figures)), flush=True)
