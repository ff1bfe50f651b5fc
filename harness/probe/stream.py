"""What one streamed decoder layer costs on this machine, through the very code a run streams it with.

The link rates and one layer's compute, each timed alone, miss what a pass adds around them: the pipeline's
per-unit work in Python (the fetch, the copy into a packed buffer, the decode's many small ops, the timeline),
and, with prefetch on, the worker competing with the compute for the cores and the GIL, which can make a pass
slower than no prefetch at all. This probe measures them together: a
StreamingModel of the run's geometry, cut to a few decoder layers and a tiny vocabulary, whose layers are copies of
one synthetic layer file written with the run's codec, read by the run's cache, prefetcher and KV cache policy.
Passes of two such models (2 layers, and 6 or the run's whole decoder: `layer_counts`) are timed in turn; their
difference is what a decoder layer adds to a pass (its fetch, decode and compute, as they overlap), and the rest is
what a pass costs beside its layers. The interval between two layers' compute in one model would be cheaper to take,
but it assumes the prefetch worker's overlap is steady from layer to layer, which the difference does not need.
Neither model has a single layer: after the eviction a pass's first layers cost more than its later ones (with
prefetch on, the second layer's fetch is the first to overlap a layer's compute), so the difference is taken past
them.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING

import torch

from harness.allocator import host_malloc
from harness.device import indexed_device, last_level_cache_bytes
from harness.measurement.vram import decoded_bytes
from harness.probe.compute import random_weights
from strategies.checks import check_positive

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from strategies.cache.configs import CacheConfig
    from strategies.compression.configs import CompressionConfig
    from strategies.kv_cache.configs import KVCacheConfig
    from strategies.prefetch.configs import PrefetchConfig

# The truncated models' decoder layers (`layer_counts`): the difference of their passes' times, over the difference
# of their counts, is one layer's.
FEW_LAYERS = 2
LAYERS = 6
# A run's decoder that decodes to at most this many bytes is probed whole: its larger truncated model has every layer
# the run has, and costs at most this much memory and disk.
WHOLE_DECODER_BYTES = 256 * 2**20
# The truncated models' vocabulary: small enough that the embedding and lm_head cost nothing beside a layer (the
# run's own head is priced apart, by the head compute probe, the link rates and the cold read probe).
_VOCAB = 256
# Rounds (a pass of each model) are timed for at least MIN_SECONDS and `repeats` rounds, and then until a layer's
# figure is known to PRECISION (its standard error over itself), at most MAX_REPEATS rounds; they stop at two once
# MAX_SECONDS have gone by (a big layer on a slow device, or passes too noisy to settle).
MIN_SECONDS = 0.5
MAX_SECONDS = 10.0
MAX_REPEATS = 500
PRECISION = 0.05


@dataclass(frozen=True)
class StreamTimes:
    """Seconds per decode pass, measured through the real pipeline."""

    layer_s: float  # what one streamed decoder layer adds to a pass: its fetch, decode and compute, as they overlap
    pass_s: float  # what a pass costs beside its decoder layers and its head: embedding, rope and mask, bookkeeping


def layer_counts(config: LlamaConfig) -> tuple[int, int]:
    """The truncated models' decoder layer counts for a run of `config`: FEW_LAYERS, and LAYERS or, where the
    run's decoder is small (WHOLE_DECODER_BYTES decoded), all of its layers. With prefetch on, the layers past the
    sixth of a pass of small layers can cost less than the third to sixth did, so a figure differenced from six
    layers would not hold for the run's pass; a whole small decoder needs no extrapolation."""
    layers = config.num_hidden_layers
    whole = layers > LAYERS and layers * decoded_bytes(config, ["layers.0"]) <= WHOLE_DECODER_BYTES
    return FEW_LAYERS, layers if whole else LAYERS


class ProbeFiles:
    """The LayerFiles of a probe's scratch files, one file a unit, each read by one unit. In a truncated split,
    decoder layer i is the i-th copy of one layer file, so that each layer is read, held and cached as a file of its
    own, as in a real split."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def file(self, unit: str) -> Path:
        return self._files[f"layers.{int(unit.split('.')[1])}" if unit.startswith("layers.") else unit]

    def file_bytes(self, unit: str) -> int:
        return self.file(unit).stat().st_size

    def readers(self, unit: str) -> int:
        return 1


def _write_units(
    config: LlamaConfig, dtype: torch.dtype, codec: object, folder: Path, layers: int
) -> dict[str, Path]:
    """One decoder layer (and `layers` - 1 copies of its file), the embedding, the final norm and lm_head of `config`
    (its vocabulary already cut), random, stored by `codec` in packed safetensors files as the split writes them."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with init_empty_weights():
        decoder = LlamaDecoderLayer(config, 0)
    shapes = {
        "layers": {name: t.shape for name, t in decoder.state_dict().items()},
        "embed": {"weight": torch.Size([config.vocab_size, config.hidden_size])},
        "norm": {"weight": torch.Size([config.hidden_size])},
        "lm_head": {"weight": torch.Size([config.vocab_size, config.hidden_size])},
    }
    paths = {}
    for unit, unit_shapes in shapes.items():
        weights = random_weights(unit_shapes, config, dtype, torch.device("cpu"))
        stored = codec.encode("layers.0" if unit == "layers" else unit, weights)  # type: ignore[attr-defined]
        paths[unit] = folder / f"{unit}.safetensors"
        save_file({k: t.contiguous() for k, t in stored.items()}, str(paths[unit]), metadata={"format": "pt"})
    layer = paths.pop("layers")
    for index in range(layers):
        paths[f"layers.{index}"] = folder / f"layers.{index}.safetensors"
        shutil.copyfile(layer, paths[f"layers.{index}"])
    layer.unlink()
    return paths


# Layer files written this process, by geometry, dtype and codec, newest last: a plan that probes streamed and resident
# layers, or the advisor probing every prefetch and cache option, draws and encodes a (70B: 1.7 GB) layer once.
_WRITTEN: dict[tuple[object, ...], tuple[tempfile.TemporaryDirectory[str], ProbeFiles]] = {}
# Codecs' files kept at once (each the larger truncated model's layers, on disk in the probe's folder).
_KEPT = 3


def _written_files(config: LlamaConfig, dtype: torch.dtype, codec: object, scratch_dir: Path) -> ProbeFiles:
    """The truncated split of `config` stored by `codec`: written once per process into a temporary folder of
    `scratch_dir` (removed when the process ends, or once _KEPT newer ones are written); the folders of processes
    that died before removing theirs are removed first."""
    key = (config.to_json_string(), str(dtype), codec.split_key)  # type: ignore[attr-defined]
    if key in _WRITTEN:
        _WRITTEN[key] = _WRITTEN.pop(key)  # the newest now
        return _WRITTEN[key][1]
    scratch_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(scratch_dir, "stream")
    while len(_WRITTEN) >= _KEPT:
        folder, _ = _WRITTEN.pop(next(iter(_WRITTEN)))
        folder.cleanup()
    folder = tempfile.TemporaryDirectory(prefix=f"stream-{os.getpid()}-", dir=scratch_dir)
    # Untimed, and blocks of many sizes: glibc's defaults hand them back after (as a split's writing is).
    with host_malloc("glibc"):
        files = ProbeFiles(_write_units(config, dtype, codec, Path(folder.name), layer_counts(config)[1]))
    _WRITTEN[key] = (folder, files)
    return files


def remove_orphans(scratch_dir: Path, prefix: str) -> None:
    """Remove the scratch folders (`<prefix>-<pid>-*`) of processes no longer running (killed before they could)."""
    import psutil

    for folder in scratch_dir.glob(f"{prefix}-*-*"):
        pid = folder.name.split("-")[1]
        if folder.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


class _Truncated:
    """A StreamingModel of `config` cut to `layers` decoder layers, each read from its copy of the layer file, with
    the options' cache, codec, prefetcher and KV cache policy; its KV cache holds `context` positions (without a
    KV cache, each pass computes them all). `resident`: the decoder layers are kept on the device as residency
    keeps them, decoded each pass but never fetched."""

    def __init__(
        self, config: LlamaConfig, layers: int, files: ProbeFiles, device: torch.device,
        options: dict[str, object], batch: int, context: int, resident: bool, steps: int = 1, verify: str = "exact",
    ) -> None:
        import strategies
        from harness.measurement.metrics import device_clock
        from harness.measurement.timeline import StageClock
        from harness.streaming.model import StreamingModel
        from harness.streaming.pipeline import LayerPipeline

        cut = copy.deepcopy(config)
        cut.num_hidden_layers = layers
        units = ["embed", *(f"layers.{i}" for i in range(layers)), "norm", "lm_head"]
        stages = StageClock(device)
        pipeline = LayerPipeline(
            cache=strategies.build(options["cache"], files=files, device=device),
            codec=strategies.build(options["compression"]),
            prefetcher=strategies.build(options["prefetch"], device=device),
            device=device,
            clock=stages,
        )
        if resident:
            pipeline.keep_resident(files, units[1:-2])
        kv_policy = strategies.build(options["kv_cache"])
        self.clock = device_clock(device)
        self.model = StreamingModel(cut, units, pipeline, kv_policy, device, self.clock, stages)
        self.ids = torch.randint(0, cut.vocab_size, (batch, context), device=device)
        self.steps, self.verify = steps, verify
        # A verifying pass (steps > 1) scores each sequence's k + 1 positions with a cache of its own, as
        # speculative decoding does; a greedy pass, the batch's one new token each with one cache.
        rows = [self.ids[i : i + 1] for i in range(batch)] if steps > 1 else [self.ids]
        self.rows = [(row, kv_policy.new_cache(cut, device)) for row in rows]
        with torch.inference_mode():
            for row, cache in self.rows:
                if cache is not None:  # the prefill: the KV cache holds the context, as in generation
                    self.model.forward(row, cache)

    def pass_seconds(self) -> float:
        """One decode pass (a verifying pass of `steps` positions a sequence), timed until its output exists."""
        start = self.clock()
        with torch.inference_mode():
            if self.steps == 1:
                ((row, cache),) = self.rows
                self.model.forward(row[:, -1:] if cache is not None else row, cache)
            elif self.verify == "exact":  # each position a one-token step (without a cache, a whole sequence)
                inputs = [(row[:, -1:] if cache is not None else row, cache) for row, cache in self.rows]
                self.model.forward_steps(
                    [step for step, _ in inputs for _ in range(self.steps)],
                    caches=[cache for _, cache in inputs for _ in range(self.steps)],
                )
            else:  # batched: one call over the positions of one sequence
                ((row, cache),) = self.rows
                self.model.forward(row[:, -self.steps :] if cache is not None else row, cache, all_positions=True)
        elapsed = self.clock() - start
        self.model.timeline.events.clear()  # the bookkeeping a run keeps, without letting it grow
        for row, cache in self.rows:
            if (grown := cache.get_seq_length() - row.shape[1] if cache is not None else 0) > 0:
                cache.crop(-grown)  # every pass attends to the same context (a negative count removes that many)
        return elapsed


def cache_evictor(config: LlamaConfig, device: torch.device) -> Callable[[], None] | None:
    """What runs before each of the probe's passes. Between two uses of one decoder layer's weights a run computes
    every other layer, while the truncated models' few layers, computed pass after pass, would find theirs still in
    the device's caches. Writing as many bytes as the run's other layers decode to puts the probe's layers where the
    run's are, whatever the caches' size and whoever else shares them (at most twice the last-level cache, which
    evicts it all). None where the run has no other layer."""
    other_bytes = (config.num_hidden_layers - 1) * decoded_bytes(config, ["layers.0"])
    if other_bytes <= 0:
        return None
    buffer = torch.empty(min(other_bytes, 2 * last_level_cache_bytes(device)), dtype=torch.uint8, device=device)

    def evict() -> None:
        buffer.fill_(0)

    return evict


def settled(few: list[float], many: list[float], span: int) -> bool:
    """Whether the layer's figure from these passes (the difference of their medians over `span`, the layers the
    larger model has over the smaller) is known to PRECISION: its standard error, from each model's scatter (1.4826
    median absolute deviations, robust to a stray pass) as a median's of that many samples (1.2533 sigma /
    sqrt(n)), at most PRECISION of the figure."""

    def error(seconds: list[float]) -> float:
        middle = statistics.median(seconds)
        sigma = 1.4826 * statistics.median(abs(s - middle) for s in seconds)
        return 1.2533 * sigma / math.sqrt(len(seconds))

    layer_s = (statistics.median(many) - statistics.median(few)) / span
    layer_error = math.hypot(error(few), error(many)) / span
    return layer_s > 0 and layer_error <= PRECISION * layer_s


def measure_stream(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, *, cache: CacheConfig,
    compression: CompressionConfig, prefetch: PrefetchConfig, kv_cache: KVCacheConfig, scratch_dir: Path,
    batch: int = 1, context: int = 8, resident: bool = False, repeats: int = 3, steps: int = 1,
    verify: str = "exact",
) -> StreamTimes:
    """A decoder layer's and a pass's own cost (`StreamTimes`) for these options, on `device`: the median passes of
    `config` cut to `layer_counts` decoder layers, `batch` sequences decoding one token each after `context`
    positions (`_Truncated`), differenced; each pass follows `cache_evictor`'s. `steps` > 1: the pass speculative
    decoding verifies with, scoring that many positions a sequence, each as its own one-token step
    (`verify="exact"`) or in one call ("batched")."""
    import strategies

    check_positive("batch", batch)
    check_positive("repeats", repeats)
    check_positive("context", context)
    check_positive("steps", steps)
    if verify == "batched" and batch > 1:
        raise ValueError("a batched verifying pass scores one sequence: give batch=1, or verify='exact'")
    device = indexed_device(device)
    config = copy.deepcopy(config)
    config.vocab_size = _VOCAB
    config._attn_implementation = "sdpa"
    options = {"cache": cache, "compression": compression, "prefetch": prefetch, "kv_cache": kv_cache}
    files = _written_files(config, dtype, strategies.build(compression), scratch_dir)
    counts = layer_counts(config)
    span = counts[1] - counts[0]
    models = [_Truncated(config, n, files, device, options, batch, context, resident, steps, verify) for n in counts]
    evict = cache_evictor(config, device) or (lambda: None)  # untimed, before each pass
    for model in models:  # untimed: lazy initialization, the allocator's growth, the page cache
        evict()
        model.pass_seconds()
    # The two models' passes in turn, so that a change in the machine's load lands on both alike; repeated for
    # MIN_SECONDS, so that a pass of a millisecond is not judged on three samples, and on while they scatter.
    times: list[list[float]] = [[] for _ in models]
    start = perf_counter()
    while len(times[0]) < MAX_REPEATS:
        elapsed, done = perf_counter() - start, len(times[0])
        if done >= repeats and elapsed >= MIN_SECONDS and settled(*times, span) or done >= 2 and elapsed >= MAX_SECONDS:
            break
        for model, seconds in zip(models, times, strict=True):
            evict()
            seconds.append(model.pass_seconds())
    few, many = (statistics.median(seconds) for seconds in times)
    layer_s = (many - few) / span
    if layer_s <= 0:
        # The passes' noise outweighed the layers between the models: the larger model's pass, all of it, per layer
        # is the safe bound.
        return StreamTimes(layer_s=many / counts[1], pass_s=0.0)
    return StreamTimes(layer_s=layer_s, pass_s=max(0.0, few - layer_s * counts[0]))


