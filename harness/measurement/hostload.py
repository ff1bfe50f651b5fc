"""What the host did while a generation ran: this process's CPU use, the hypervisor's steal and the cgroup's
CPU throttling, from the operating system's own counters (psutil, and the cgroup's cpu.stat), and how fast
its CPU ran this process's Python, timed at each new token.

On a GPU the host issues every copy, decode and kernel: a host slowed by a CPU quota or by a busy hypervisor
slows the token, and the compute's issue time (`compute_issue_s`) alone cannot say which; these figures tell
the causes apart (docs/findings.md has what they showed). Each figure is absent where its counter is (no cgroup
CPU controller, say), never 0.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import psutil

CGROUP = Path("/sys/fs/cgroup")
# cgroup v2 counts the throttled time in microseconds; v1's cpu controller in nanoseconds.
THROTTLED = (("cpu.stat", "throttled_usec", 1e-6), ("cpu/cpu.stat", "throttled_time", 1e-9))


def throttled_s(cgroup: Path = CGROUP) -> float | None:
    """Seconds this cgroup's tasks were held back by its CPU quota, since it began; None without a counter."""
    for file, key, unit in THROTTLED:
        try:
            for line in (cgroup / file).read_text().splitlines():
                field, _, value = line.partition(" ")
                if field == key:
                    return int(value) * unit
        except (OSError, ValueError):
            continue
    return None


def cpu_quota_cores(cgroup: Path = CGROUP) -> float | None:
    """The cores' worth of CPU time this cgroup may use (its CFS quota over its period); None without a quota."""
    try:  # v2: "max 100000" (no quota) or "<quota> <period>"
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1: a quota of -1 is none
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us < 0 else quota_us / period_us


# A fixed pure-Python loop, tens of microseconds: small beside even the tiny model's per-token time and far smaller
# beside a real model's (it runs between tokens, inside the timed span).
LOOP_ITERATIONS = 1000


def loop_s() -> float:
    """Seconds the fixed loop took: a vCPU slowed by its neighbours (a busy sibling core, the host's clocks) shows
    here though it steals nothing, and its per-token time slows with it."""
    t0 = time.perf_counter()
    sum(range(LOOP_ITERATIONS))
    return time.perf_counter() - t0


# Above this, a job's generations and transformers' reference ran on a host of different speeds: well above the
# median loop's spread within one state of the host, well below the gap between its fast and slow states.
HOST_SPEED_TOLERANCE = 0.2


def speed_warning(loop: float | None, reference_loop: float | None) -> str | None:
    """Why a same-job ratio to the reference is not to be trusted, when the host's speed changed between them."""
    if not loop or not reference_loop or abs(loop / reference_loop - 1) <= HOST_SPEED_TOLERANCE:
        return None
    return (
        f"the host ran this job's generations at {reference_loop / loop:.2f}x the speed it ran transformers' "
        f"reference at (a fixed loop: {loop * 1e6:.0f} us against {reference_loop * 1e6:.0f} us): "
        "tpot_ratio_vs_reference is skewed by the machine, not the code"
    )


def _steal_and_total() -> tuple[float, float]:
    t = psutil.cpu_times()
    # Linux counts guest time inside user and nice too: summing every field would count it twice.
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return getattr(t, "steal", 0.0), total


class HostLoad:
    """Counters read when made and again by `metrics()`: the generation in between is what they describe."""

    def __init__(self, cgroup: Path = CGROUP) -> None:
        self.cgroup = cgroup
        self._wall = time.perf_counter()
        self._cpu = self._process_cpu_s()
        self._steal, self._total = _steal_and_total()
        self._throttled = throttled_s(cgroup)
        self._loops: list[float] = []

    def token(self) -> None:
        """At each new token: the fixed loop's time."""
        self._loops.append(loop_s())

    @staticmethod
    def _process_cpu_s() -> float:
        times = os.times()  # every thread of the process: the prefetch worker's and the samplers' too
        return times.user + times.system

    def metrics(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        out: dict[str, float] = {}
        if wall > 0:
            # 1.0: one core busy the whole time. A thread spinning in a device wait counts as busy.
            out["process_cpu_share"] = (self._process_cpu_s() - self._cpu) / wall
        steal, total = _steal_and_total()
        if total > self._total:
            out["host_steal_share"] = (steal - self._steal) / (total - self._total)
        throttled = throttled_s(self.cgroup)
        if throttled is not None and self._throttled is not None and wall > 0:
            out["cpu_throttled_share"] = (throttled - self._throttled) / wall
        if self._loops:
            out["host_loop_s"] = statistics.median(self._loops)
        return out
