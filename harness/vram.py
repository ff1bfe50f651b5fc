"""Device memory: the allocator's peaks, the driver's view of the process, and the cap.

On CPU there is no VRAM: every figure here is absent, never 0.
"""

from __future__ import annotations

import logging
import os
import threading
from types import TracebackType

import torch

log = logging.getLogger(__name__)

GIB = 1 << 30


class VramCapExceeded(RuntimeError):
    pass


def _nvml_process_bytes(handle: object) -> int | None:
    import pynvml

    pid = os.getpid()
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid:
            return int(proc.usedGpuMemory or 0)
    return None


class VramMonitor:
    """Enforces `cap_gib` on a CUDA device and records the peaks.

    The cap covers what the driver sees (CUDA context included), so the caching
    allocator gets the cap minus the context, measured by NVML at start; a background
    sampler catches the process's true peak, which the allocator's counters miss.
    """

    def __init__(self, device: torch.device, cap_gib: float, interval_s: float = 0.005) -> None:
        self.device = device
        self.cap_bytes = int(cap_gib * GIB)
        self.interval_s = interval_s
        self.nvml_peak_bytes: int | None = None
        self.context_bytes: int | None = None
        self._handle: object | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> VramMonitor:
        if not self.active:
            return self
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.context_bytes = _nvml_process_bytes(self._handle)
        except Exception as exc:  # NVML missing or unsupported: the allocator cap still applies
            log.warning("NVML unavailable (%s): VRAM peak is the allocator's only; context not measured", exc)
        allocator_bytes = self.cap_bytes - (self.context_bytes or 0)
        if allocator_bytes <= 0:
            raise VramCapExceeded(
                f"the CUDA context alone uses {self.context_bytes} bytes, over vram.cap_gib={self.cap_bytes / GIB}"
            )
        torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_bytes / total), self.device)
        if self._handle is not None:
            self.nvml_peak_bytes = self.context_bytes
            self._thread = threading.Thread(target=self._sample, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = _nvml_process_bytes(self._handle)
            if used is not None:
                self.nvml_peak_bytes = max(self.nvml_peak_bytes or 0, used)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def metrics(self) -> dict[str, float]:
        if not self.active:
            return {}
        out = {
            "peak_vram_allocated_bytes": float(torch.cuda.max_memory_allocated(self.device)),
            "peak_vram_reserved_bytes": float(torch.cuda.max_memory_reserved(self.device)),
        }
        if self.nvml_peak_bytes is not None:
            out["peak_vram_nvml_bytes"] = float(self.nvml_peak_bytes)
        if self.context_bytes is not None:
            out["cuda_context_bytes"] = float(self.context_bytes)
        return out

    def check(self) -> None:
        """Raise if the run went over the cap (the allocator limit cannot see the context)."""
        peak = self.nvml_peak_bytes
        if self.active and peak is not None and peak > self.cap_bytes:
            raise VramCapExceeded(f"peak VRAM {peak / GIB:.2f} GiB (NVML) exceeded the cap {self.cap_bytes / GIB} GiB")
