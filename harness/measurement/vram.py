"""Device memory: the allocator's peaks, the driver's view of the process, and the cap.

On CPU there is no VRAM: every figure here is absent, never 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from harness.measurement.memory import PeakSampler

if TYPE_CHECKING:
    from harness.config import VramConfig

log = logging.getLogger(__name__)

GIB = 1 << 30


class VramCapExceeded(RuntimeError):
    pass


class MemoryProbe(Protocol):
    def process_bytes(self) -> int | None:
        """Device memory this process holds as the driver sees it (context included), or None."""
        ...


def nvml_handle(pynvml: Any, cuda_index: int) -> Any:
    """NVML's handle for CUDA device ``cuda_index``.

    The indices differ: NVML numbers every GPU of the machine, CUDA only those CUDA_VISIBLE_DEVICES
    lets it see, in its own order (CUDA_DEVICE_ORDER). The device's UUID is the same in both.
    """
    uuid = torch.cuda.get_device_properties(cuda_index).uuid
    return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")


class NvmlProbe:
    def __init__(self, device: torch.device) -> None:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._handle = nvml_handle(pynvml, index)

    def process_bytes(self) -> int | None:
        import pynvml

        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory or 0)
        return None


def default_probe(device: torch.device) -> MemoryProbe | None:
    """NVML on CUDA; nothing elsewhere (there is no VRAM to watch). Tests inject a fake here."""
    if device.type != "cuda":
        return None
    try:
        return NvmlProbe(device)
    except Exception as exc:  # NVML missing or unsupported: the allocator cap still applies
        log.warning("NVML unavailable (%s): VRAM peak is the allocator's only; context not measured", exc)
        return None


class VramMonitor:
    """Enforces `cap_gib` on a CUDA device and records the peaks.

    The cap covers what the driver sees (CUDA context included), so the caching
    allocator gets the cap minus the context, measured by NVML at start; a background
    sampler catches the process's true peak, which the allocator's counters miss.
    """

    def __init__(
        self, device: torch.device, cap_gib: float, interval_s: float = 0.005, expandable_segments: bool | None = None
    ) -> None:
        self.device = device
        self.cap_bytes = int(cap_gib * GIB)
        self.expandable_segments = expandable_segments
        self.interval_s = interval_s
        self.context_bytes: int | None = None
        self.probe: MemoryProbe | None = None
        self._sampler: PeakSampler | None = None

    @classmethod
    def from_config(cls, device: torch.device, cfg: VramConfig) -> VramMonitor:
        return cls(device, cfg.cap_gib, cfg.sample_interval_s, expandable_segments=cfg.expandable_segments)

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    @property
    def enforced(self) -> bool:
        """The cap applies: on CUDA, or wherever a memory probe watches (tests inject one on CPU)."""
        return self.active or self.probe is not None

    @property
    def nvml_peak_bytes(self) -> int | None:
        """The probe's highest reading, the context's at start included; None without a probe or a reading."""
        readings = (self.context_bytes, self._sampler.peak_bytes if self._sampler is not None else None)
        return max((b for b in readings if b is not None), default=None)

    def __enter__(self) -> VramMonitor:
        if self.active:
            torch.cuda.init()  # the context exists before we measure it
            if self.expandable_segments is not None:
                # Before the cache is emptied: the blocks this job takes come from segments of the kind it asked for.
                try:
                    torch.cuda.memory._set_allocator_settings(f"expandable_segments:{self.expandable_segments}")
                except (AttributeError, RuntimeError) as exc:  # a private API: a torch without it runs as before
                    log.warning("vram.expandable_segments=%s not applied (%s)", self.expandable_segments, exc)
            # Blocks an earlier job of this process left in the caching allocator are not context: counted as such,
            # they would shrink a later job's allocator cap, or refuse the job.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.probe = default_probe(self.device)
        if self.probe is not None:
            used = self.probe.process_bytes()
            held = torch.cuda.memory_reserved(self.device) if self.active else 0  # live tensors: the allocator's
            self.context_bytes = None if used is None else max(used - held, 0)
        if self.active:
            allocator_bytes = self.cap_bytes - (self.context_bytes or 0)
            if allocator_bytes <= 0:
                raise VramCapExceeded(
                    f"the CUDA context alone uses {self.context_bytes} bytes, over vram.cap_gib={self.cap_bytes / GIB}"
                )
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_bytes / total), self.device)
        if self.probe is not None:
            self._sampler = PeakSampler(self.probe.process_bytes, self.interval_s, name="vram-sampler").start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._sampler is not None:
                self._sampler.stop()
        finally:
            if self.active:
                # The cap is the streaming run's; the resident reference and the probe that follow are not held to it.
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.active:
            out["peak_vram_allocated_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
            out["peak_vram_reserved_bytes"] = float(torch.cuda.max_memory_reserved(self.device))
        if self.nvml_peak_bytes is not None:
            out["peak_vram_nvml_bytes"] = float(self.nvml_peak_bytes)
        if self.context_bytes is not None:
            out["cuda_context_bytes"] = float(self.context_bytes)
        if self._sampler is not None and self._sampler.read_mean_s is not None:
            out["nvml_read_s"] = self._sampler.read_mean_s
            out["nvml_read_max_s"] = self._sampler.read_max_s
        return out

    def check(self) -> None:
        """Raise if the run went over the cap (the allocator limit cannot see the context)."""
        peak = self.nvml_peak_bytes
        if peak is not None and peak > self.cap_bytes:
            raise VramCapExceeded(f"peak VRAM {peak / GIB:.2f} GiB (NVML) exceeded the cap {self.cap_bytes / GIB} GiB")


class DeviceAllocs:
    """The caching allocator's device allocations (its cudaMalloc calls) after a generation's first new token,
    per later token: about 0 when the decode passes reuse the blocks the prefill pass took, and at least one
    per streamed unit if layers were given new device memory each pass. Also its retries: an allocation that
    found no free block under the cap, so the allocator freed every cached block (a device-wide wait) and
    tried again. Absent off CUDA.

    Feed it the generation's `on_token`; read `metrics()` as soon as the generation returns.
    """

    STATS = {"num_device_alloc": "device_allocs_per_token", "num_alloc_retries": "device_alloc_retries_per_token"}

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tokens = 0
        self.at_first: dict[str, int] = {}

    def _counts(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {key: stats[key] for key in self.STATS if key in stats}

    def token(self) -> None:
        self.tokens += 1
        if self.tokens == 1:  # one stats read in the timed loop (tens of µs), not one per token
            self.at_first = self._counts()

    def metrics(self) -> dict[str, float]:
        if self.tokens < 2:
            return {}
        now = self._counts()
        return {
            name: (now[key] - self.at_first[key]) / (self.tokens - 1)
            for key, name in self.STATS.items()
            if key in now and key in self.at_first
        }


def estimate_need_bytes(
    config: LlamaConfig,
    *,
    stored_fraction: float,
    layers_ahead: int,
    kv_layers: int,
    max_seq: int,
    batch: int = 1,
    static_layers: int = 0,
    kv_held: Callable[[int, int, int], int] | None = None,
) -> dict[str, int]:
    """What a run must hold on the device at once, from the geometry alone (before anything is loaded).

    Weights: the largest unit decoded, once for the layer computing and once per layer loaded ahead
    (`layers_ahead`, the prefetcher's), plus its stored (encoded) form while it decodes
    (`stored_fraction`, the codec's), plus `static_layers` decoder layers held throughout (the decode graphs'
    static copy, runner.cuda_graph). KV: `kv_layers` layers' keys and values (the KV policy's) at
    the longest sequence, as the policy stores them (`kv_held(values per position, positions, itemsize)`,
    `KVCachePolicy.held_bytes`; by default in the model's dtype). Activations: a few hidden-state copies and
    the MLP's intermediate over the sequence, plus fp32 logits; KV and activations once per sequence of the
    batch.
    """
    dtype = model_dtype(config)
    layer_bytes = decoder_layer_bytes(config)
    largest = max(layer_bytes, config.vocab_size * config.hidden_size * dtype.itemsize)
    weights = int(largest * (1 + layers_ahead) + largest * stored_fraction) + static_layers * layer_bytes
    values = 2 * config.num_key_value_heads * config.head_dim  # keys and values of one position in one layer
    if kv_held is None:
        kv = kv_layers * values * max_seq * dtype.itemsize * batch
    else:
        kv = kv_layers * kv_held(values, max_seq, dtype.itemsize) * batch
    activations = (6 * config.hidden_size + 2 * config.intermediate_size) * max_seq * dtype.itemsize * batch
    activations += config.vocab_size * 4 * batch
    return {"weights": weights, "kv": kv, "activations": activations, "total": weights + kv + activations}


def model_dtype(config: LlamaConfig) -> torch.dtype:
    dtype = config.dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)


def decoder_layer_bytes(config: LlamaConfig) -> int:
    """One decoder layer's parameters, counted on a weightless meta-device copy of transformers' module."""
    with init_empty_weights():
        layer = LlamaDecoderLayer(config, 0)
    return compute_module_sizes(layer, dtype=model_dtype(config))[""]


def decoded_bytes(config: LlamaConfig, units: list[str]) -> int:
    """These units' weights as computed on, in the model's dtype (what a codec decodes them back to)."""
    itemsize = model_dtype(config).itemsize
    layers = sum(u.startswith("layers.") for u in units)
    others = sum(config.hidden_size if u == "norm" else config.vocab_size * config.hidden_size
                 for u in units if not u.startswith("layers."))
    return (decoder_layer_bytes(config) if layers else 0) * layers + others * itemsize


def check_fits(need: dict[str, int], cap_gib: float, context_bytes: int) -> None:
    cap = int(cap_gib * GIB)
    if need["total"] + context_bytes > cap:
        parts = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in need.items() if k != "total")
        raise VramCapExceeded(
            f"this configuration needs about {(need['total'] + context_bytes) / GIB:.2f} GiB of device memory "
            f"({parts}, CUDA context {context_bytes / GIB:.2f} GiB), over vram.cap_gib={cap_gib}: "
            "use compression=8bit/4bit, a smaller prefetch.depth, kv_cache=offload or quantized, or a larger cap"
        )
