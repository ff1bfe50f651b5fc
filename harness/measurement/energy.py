"""What a generation costs in energy: the prefill's joules, the joules of each decoded token, the mean power.

On CUDA the source is NVML's total-energy counter of the device (millijoules since the driver loaded); on a CPU,
the RAPL package counters under /sys/class/powercap where the kernel exposes them and they are readable (microjoules,
wrapping at `max_energy_range_uj`). Where neither is, the figures are absent and `energy.source` says why. A
counter is read at the generation's start, at its first token (the end of the prefill) and at its last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Counter:
    """Cumulative energy counters, read together: each reading is one value per counter, in joules."""

    read: Callable[[], list[float]]
    ranges_j: list[float | None]  # where each counter wraps back to 0; None: it does not in practice
    source: str  # the energy.source tag: which counter this is

    def joules(self, before: Sequence[float], after: Sequence[float]) -> float:
        """Energy between two readings, summed over the counters, each unwrapped once if it wrapped."""
        total = 0.0
        for a, b, wrap in zip(before, after, self.ranges_j, strict=True):
            delta = b - a
            if delta < 0 and wrap:
                delta += wrap
            total += delta
        return total


def nvml_counter(device: torch.device) -> Counter | str:
    """The device's NVML total-energy counter, or why there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # refused on GPUs without the counter (before Volta)
    except Exception as exc:  # NVML's errors are many classes; each one means: no counter here
        return f"none: NVML's energy counter is unavailable ({type(exc).__name__}: {exc})"

    def read() -> list[float]:
        return [pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3]

    return Counter(read, [None], f"nvml: GPU {device.index or 0} total energy counter")


def rapl_counter(root: Path = POWERCAP) -> Counter | str:
    """The CPU packages' RAPL counters (`intel-rapl:N`, not their subdomains), or why there are none."""
    if not root.is_dir():
        return f"none: no RAPL counter ({root} absent: no powercap driver, as in most virtual machines)"
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not zones:
        return f"none: no RAPL package counter under {root}"
    try:
        ranges = [float((zone / "max_energy_range_uj").read_text()) / 1e6 for zone in zones]
        for zone in zones:
            (zone / "energy_uj").read_text()
    except OSError as exc:  # unreadable for non-root users since kernel 5.10 (a side channel)
        return f"none: RAPL counters under {root} are not readable ({exc.strerror or exc})"

    def read() -> list[float]:
        return [float((zone / "energy_uj").read_text()) / 1e6 for zone in zones]

    names = ", ".join(zone.name for zone in zones)
    return Counter(read, list(ranges), f"rapl: {names} (CPU packages, all of the machine, not this process)")


def energy_counter(device: torch.device) -> Counter | str:
    """The counter that measures this device's energy, or the reason there is none (the energy.source tag)."""
    return nvml_counter(device) if device.type == "cuda" else rapl_counter()


class EnergyMeter:
    """One generation's readings: `start()` before it, `token()` as each token arrives (only the first reads: it
    ends the prefill), `end()` after it, then `metrics()`. With no counter it measures nothing."""

    def __init__(self, counter: Counter | None) -> None:
        self.counter = counter
        self.readings: list[list[float]] = []

    def start(self) -> None:
        if self.counter is not None:
            self.readings = [self.counter.read()]

    def token(self) -> None:
        if self.counter is not None and len(self.readings) == 1:
            self.readings.append(self.counter.read())  # the prefill's end; later tokens cost no reading

    def end(self) -> None:
        if self.counter is not None and len(self.readings) == 2:
            self.readings.append(self.counter.read())

    def metrics(self, new_tokens: int, duration_s: float) -> dict[str, float]:
        """`energy_prefill_j`, `energy_per_token_j` (each decoded token after the first) and `power_mean_w`."""
        if self.counter is None or len(self.readings) < 2:
            return {}
        joules = self.counter.joules
        out = {"energy_prefill_j": joules(self.readings[0], self.readings[1])}
        if len(self.readings) == 3 and new_tokens > 1:
            out["energy_per_token_j"] = joules(self.readings[1], self.readings[2]) / (new_tokens - 1)
        if duration_s > 0:
            out["power_mean_w"] = joules(self.readings[0], self.readings[-1]) / duration_s
        return out
