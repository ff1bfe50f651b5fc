"""The lease's runs (scripts/gpulease.py), in the order they run, and what each needs: its preset and model, the
folders it reads that a run writes first (checkpoints, splits, a peer's own split), the disk they take and the
seconds they are estimated to cost, so that the runs that cannot fit are skipped with the reason.

The estimates are guesses for the real geometries on one GPU with a fast host link and a local disk; a run on a
smaller model scales its own with its weights' bytes, and what it builds is costed from the bytes it writes. Each
run's estimate is in the results beside its elapsed time, so the results show how far off they were.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpucheck_jobs import composed, preset, preset_choices

# The geometry each run stands for, as the model option the lease runs it with.
MODELS = {"8B": "llama3-8b-synthetic", "1B": "llama3.2-1b-synthetic", "70B": "llama3-70b-synthetic"}
# --smoke: every geometry as the tiny model, the 70B's generated straight into its splits as the 70B is.
SMOKE_MODEL = "tiny"

# Seconds before the first run: the worker process starting (torch, CUDA), the probe refreshed, a warm-up job.
SETUP_S = 45.0
# Bytes a checkpoint, a split or AirLLM's own split is written at, and a split's source read at (the estimates).
WRITE_BYTES_PER_S = 0.4e9
READ_BYTES_PER_S = 2e9
# transformers' reference: the whole checkpoint loaded, then moved onto the device.
REFERENCE_BYTES_PER_S = 1e9
# Kept free beside what a run writes: its record, logs, a partly written file.
DISK_MARGIN_BYTES = 2 << 30
GB = 1e9


@dataclass(frozen=True)
class LeaseRun:
    label: str
    preset: str  # conf/experiment/gpucheck/<preset>.yaml
    size: str  # the geometry it stands for: a key of MODELS
    run_s: float  # estimated seconds of its load and generation at that geometry, what it builds apart
    # Runs (labels of FALLBACK_RUNS) made in its place when it does not fit the time or the disk, or times out.
    fallback: tuple[str, ...] = ()


# The default runs, most important evidence first: what a lease that ends early must already hold.
RUNS = (
    LeaseRun("8B, layerbench, 4bit, ram, prefetch", "4bit_ram_prefetch", "8B", 20),
    LeaseRun("8B, accelerate, ram", "accelerate_ram", "8B", 40),
    LeaseRun("8B, accelerate, disk", "accelerate_disk", "8B", 50),
    LeaseRun("8B, airllm, 4bit", "airllm_4bit", "8B", 60,
             fallback=("1B, layerbench, 4bit, ram, prefetch", "1B, airllm, 4bit")),
    LeaseRun("8B, layerbench, 4bit, ram, prefetch, resident", "4bit_ram_prefetch_resident", "8B", 15),
    LeaseRun("8B, layerbench, 4bit, ram, prefetch, cuda graph", "4bit_ram_prefetch_cuda_graph", "8B", 25),
    LeaseRun("70B, layerbench, 4bit, ram, resident", "70b_4bit_ram_resident", "70B", 60),
    LeaseRun("8B, layerbench, 8bit, ram, prefetch", "8bit_ram_prefetch", "8B", 20),
    LeaseRun("8B, layerbench, bf16, ram, prefetch", "bf16_ram_prefetch", "8B", 25),
    LeaseRun("70B, layerbench, 4bit, disk, cold, resident", "70b_4bit_disk_cold_resident", "70B", 150),
)
# AirLLM beside layerbench on the 1B geometry: only in place of the 8B AirLLM run (or when --only names them).
FALLBACK_RUNS = (
    LeaseRun("1B, layerbench, 4bit, ram, prefetch", "4bit_ram_prefetch", "1B", 5),
    LeaseRun("1B, airllm, 4bit", "airllm_4bit", "1B", 15),
)
ALL_RUNS = RUNS + FALLBACK_RUNS


def picked_runs(only: tuple[str, ...]) -> list[LeaseRun]:
    """The runs `--only` names, in the order asked (a word picks the runs whose label holds it, `=label` that run
    alone), or the default runs."""
    def takes(word: str, label: str) -> bool:
        return word[1:] == label if word.startswith("=") else word in label

    if not only:
        return list(RUNS)
    return list({run.label: run for word in only for run in ALL_RUNS if takes(word, run.label)}.values())


def fallback_runs(run: LeaseRun) -> list[LeaseRun]:
    by_label = {r.label: r for r in FALLBACK_RUNS}
    return [by_label[label] for label in run.fallback]


@contextlib.contextmanager
def direct_split(on: bool) -> Iterator[None]:
    """With `on`, every generated model is generated straight into its splits, as the 70B geometry is (--smoke's
    70B runs, on the tiny model)."""
    import harness.checkpoints.generated as generated

    if not on:
        yield
        return
    kept = generated.DIRECT_SPLIT_BYTES
    generated.DIRECT_SPLIT_BYTES = 0
    try:
        yield
    finally:
        generated.DIRECT_SPLIT_BYTES = kept


@dataclass(frozen=True)
class Resource:
    """A folder some run writes and later runs read: a checkpoint, a split, a peer's own split."""

    key: str
    pattern: str  # glob of its folder(s)
    bytes: int  # what it takes on disk
    build_s: float  # estimated seconds to write it
    done: str = ""  # a file inside that says it is complete; "" where the folder alone does

    def paths(self) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(self.pattern))

    def present(self) -> bool:
        return any((p / self.done).exists() if self.done else p.is_dir() for p in self.paths())

    def remove(self) -> None:
        for path in self.paths():
            shutil.rmtree(path, ignore_errors=True)
            (path.parent / f".{path.name}.lock").unlink(missing_ok=True)  # a checkpoint's build lock beside it
            with contextlib.suppress(OSError):  # a split's <checkpoint>-<hash>/ folder, once it holds no split
                path.parent.rmdir()


@dataclass
class Planned:
    """One run as the lease makes it: its overrides, its validated config and what it needs."""

    run: LeaseRun
    overrides: list[str]
    cfg: Any
    direct: bool  # generated straight into its splits, never written as a checkpoint (--smoke's 70B runs too)
    weights_bytes: int
    run_s: float  # run.run_s scaled to this model's weights
    resources: list[Resource] = field(default_factory=list)
    note: str = ""  # why it runs (a fallback's reason)

    @property
    def model_key(self) -> str:
        """The checkpoint it runs: one transformers reference serves every run of it."""
        return self.resources[0].key

    @property
    def has_weights(self) -> bool:
        """Whether a checkpoint holds its weights, so that transformers' reference can run."""
        return not self.direct

    def missing(self) -> list[Resource]:
        return [r for r in self.resources if not r.present()]

    def estimate_s(self, reference_due: bool) -> float:
        """Its own run, what it must build first, and transformers' reference when it is the model's first run."""
        built = sum(r.build_s for r in self.missing())
        return self.run_s + built + (self.weights_bytes / REFERENCE_BYTES_PER_S if reference_due else 0.0)

    def need_bytes(self) -> int:
        return sum(r.bytes for r in self.missing())


def model_weights(cfg: Any) -> int:
    """The bytes of every weight of the run's model in its dtype."""
    from harness.checkpoints.generated import llama_config_for, weights_bytes
    from harness.checkpoints.tokenizer import VOCAB_SIZE

    return weights_bytes(llama_config_for(cfg.model, VOCAB_SIZE))


@functools.cache
def nominal_weights(model: str) -> int:
    """The weight bytes of the model option `model`, the geometry a run's estimate is for."""
    return model_weights(composed([f"model={model}"])[1])


def resources_of(cfg: Any, outputs: Path, patched: bool) -> tuple[list[Resource], bool]:
    """What a run with `cfg` reads that a run writes first (its checkpoint first), and whether its model is generated
    straight into its splits (`patched`: made so, as --smoke's 70B runs are)."""
    import strategies
    from harness.checkpoints.generated import generated_dir, llama_config_for, splits_directly
    from harness.checkpoints.tokenizer import VOCAB_SIZE
    from harness.split.layout import MANIFEST
    from harness.split.sizes import predicted_split_bytes

    with direct_split(patched):
        direct = splits_directly(cfg.model)
        ckpt = generated_dir(cfg.model, outputs)
    config = llama_config_for(cfg.model, VOCAB_SIZE)
    weights = model_weights(cfg)
    written = 0 if direct else weights
    found = [Resource(f"checkpoint {ckpt.name}", glob.escape(str(ckpt)), written, written / WRITE_BYTES_PER_S,
                      done="config.json")]
    runner = cfg.runner.name
    source_s = 0.0 if direct else weights / READ_BYTES_PER_S
    if runner in ("layerbench", "airllm"):
        codec = strategies.build(cfg.compression)
        split = predicted_split_bytes(config, codec)
        build_s = split / WRITE_BYTES_PER_S + source_s
        if runner == "layerbench":
            root = Path(cfg.split.dir) if cfg.split.dir else outputs / "splits"
            pattern = str(root / f"{glob.escape(ckpt.name)}-*" / codec.split_key)
            found.append(Resource(f"split {ckpt.name} {codec.split_key}", pattern, split, build_s, done=MANIFEST))
        else:  # AirLLM's own split, of about the size of ours at the same bits
            path = outputs / "peers" / runner / ckpt.name
            found.append(Resource(f"{runner} split {ckpt.name}", glob.escape(str(path)), split, build_s))
    elif runner == "accelerate":  # its offload folder: an index, the weights read from the checkpoint in place
        path = outputs / "peers" / runner / ckpt.name
        found.append(Resource(f"{runner} offload {ckpt.name}", glob.escape(str(path)), 0, 0.0))
    return found, direct


def plan_runs(
    runs: list[LeaseRun], *, device: str, models: dict[str, str], new_tokens: int, outputs: Path, extra: list[str],
    smoke: bool,
) -> list[Planned]:
    """Each run's configuration, composed and validated before anything runs (RefusedOverrides otherwise)."""
    return [plan_run(run, device=device, models=models, new_tokens=new_tokens, outputs=outputs, extra=extra,
                     smoke=smoke) for run in runs]


def plan_run(
    run: LeaseRun, *, device: str, models: dict[str, str], new_tokens: int, outputs: Path, extra: list[str],
    smoke: bool, note: str = "",
) -> Planned:
    model = models[run.size]
    overrides = [f"device={device}", f"paths.outputs={outputs}", preset(run.preset), *preset_choices(run.preset),
                 f"model={model}", f"workload.max_new_tokens={new_tokens}"]
    if device == "cuda" and model != SMOKE_MODEL:
        overrides.append("model.generator_device=cuda")  # drawn and encoded on the GPU
    overrides += extra
    _, cfg = composed(overrides)
    resources, direct = resources_of(cfg, outputs, patched=smoke and run.size == "70B")
    weights = model_weights(cfg)
    scale = min(1.0, weights / nominal_weights(MODELS[run.size]))
    return Planned(run, overrides, cfg, direct, weights, run.run_s * scale, resources, note)


def cannot_run_here(planned: Planned) -> str | None:
    """Why this machine cannot run it at all (a runner's extra missing, an option that needs CUDA), or None."""
    import torch

    from harness.config import RunnerUnavailable, explicit_groups
    from harness.runners.base import runner_class

    cfg = planned.cfg
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.runner.cuda_graph and not on_cuda:
        return "runner.cuda_graph=true needs a CUDA device"
    try:
        runner_class(cfg).check(cfg, explicit_groups(planned.overrides))
    except RunnerUnavailable as exc:
        return str(exc)
    return None


def options_of(planned: Planned) -> dict[str, str]:
    """The option of each strategy group that the run's runner runs ("" for a group it has no counterpart for),
    as the job's params name them, and whether it replays CUDA graphs."""
    from harness.config import OPTION_GROUPS, RunnerUnavailable, explicit_groups
    from harness.runners.base import runner_class

    cfg = planned.cfg
    try:
        options = cfg.runner_options(runner_class(cfg).supports, explicit_groups(planned.overrides))
    except (RunnerUnavailable, ImportError):
        options = {group: getattr(cfg, group) for group in OPTION_GROUPS}
    named = {group: options[group].name if group in options else "" for group in OPTION_GROUPS}
    named["page_cache"] = options["cache"].page_cache if "cache" in options else ""
    named["cuda_graph"] = str(cfg.runner.cuda_graph).lower() if cfg.runner.name == "layerbench" else ""
    return named


def run_timeout_s(estimate_s: float, remaining_s: float, cap_s: float | None) -> float:
    """How long a run may take before it is killed: three times its estimate, two minutes at least over it, never
    past the budget left or `cap_s`."""
    allowed = min(max(3 * estimate_s, estimate_s + 120), remaining_s)
    return allowed if cap_s is None else min(allowed, cap_s)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or the nearest folder above it that exists)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def make_room(need: int, free: int, present: list[Resource], later: list[Planned]) -> list[Resource]:
    """What to delete, of the folders this lease made and the run at hand does not read (`present`), for `need`
    bytes more to fit beside DISK_MARGIN_BYTES: those read latest (or never again) first. Empty when it fits
    already, or when deleting them all would not make it fit."""
    short = need + DISK_MARGIN_BYTES - free
    if short <= 0:
        return []

    def next_use(resource: Resource) -> int:
        uses = [i for i, p in enumerate(later) if any(r.key == resource.key for r in p.resources)]
        return uses[0] if uses else len(later)

    chosen: list[Resource] = []
    for resource in sorted(present, key=next_use, reverse=True):
        if short <= 0:
            break
        chosen.append(resource)
        short -= resource.bytes
    return chosen if short <= 0 else []
