"""Where the time goes: every pass and layer, split into stages on one time axis.

Stages: read (cache -> host tensors), h2d (host -> device copy), decode (codec on the
device), compute (the layer's forward), release (dropping the weights). Host work is
stamped with perf_counter; device work with CUDA events on the stream that does it,
because host timers around asynchronous calls measure the launch, not the work. Both are
measured from one origin taken while the device is idle, so the stages of a prefetching
worker and of the compute stream can be drawn side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

STAGES = ("read", "h2d", "decode", "compute", "release")
LOAD_STAGES = ("read", "h2d", "decode")
# A stamp: a perf_counter reading, or a CUDA event recorded on some stream.
Stamp = Union[float, "torch.cuda.Event"]  # noqa: UP007 (a string forward ref cannot use |)
# Stage sums may differ from a pass's wall time by this much before the run is flagged.
CROSSCHECK_TOLERANCE = 0.05


class StageClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self._origin_event = torch.cuda.Event(enable_timing=True)
            self._origin_event.record()
            self._origin_event.synchronize()
        self._origin_host = time.perf_counter()

    def host(self) -> Stamp:
        return time.perf_counter()

    def device(self) -> Stamp:
        """Marks the current stream's position: on CUDA, when the device gets there, not the host."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, stamp: Stamp) -> float:
        if isinstance(stamp, float):
            return stamp - self._origin_host
        stamp.synchronize()
        return self._origin_event.elapsed_time(stamp) / 1000


@dataclass
class LayerEvent:
    """One unit in one pass: each stage's (start, end) stamps and the bytes it moved."""

    pass_index: int
    unit: str
    stamps: dict[str, tuple[Stamp, Stamp]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    # Host seconds the compute took to issue. On CUDA, near the compute's own (device) time means the host, not the
    # device, set the layer's pace: its kernels ran as fast as they were launched.
    compute_issue_s: float = 0.0
    # Host seconds the load (fetch and decode) took to issue. With prefetch on it runs on the worker thread: the two
    # threads' Python shares one GIL, so their sum near a pass's time says the host, not the device, is the limit.
    load_issue_s: float = 0.0


@dataclass
class Timeline:
    events: list[LayerEvent] = field(default_factory=list)
    passes: list[tuple[Stamp, Stamp]] = field(default_factory=list)

    def rows(self, clock: StageClock) -> list[dict[str, float | int | str]]:
        """One row per pass and unit: each stage's start and duration (s, from the clock's origin) and bytes."""
        rows = []
        for e in self.events:
            row: dict[str, float | int | str] = {"pass_index": e.pass_index, "unit": e.unit}
            for stage in STAGES:
                start, end = (clock.seconds(s) for s in e.stamps[stage]) if stage in e.stamps else (0.0, 0.0)
                row[f"{stage}_start_s"] = start
                row[f"{stage}_s"] = end - start
            for stage in LOAD_STAGES:
                row[f"{stage}_bytes"] = e.bytes.get(stage, 0)
            row["compute_issue_s"] = e.compute_issue_s
            row["load_issue_s"] = e.load_issue_s
            rows.append(row)
        return rows

    def pass_walls(self, clock: StageClock) -> list[float]:
        return [clock.seconds(end) - clock.seconds(start) for start, end in self.passes]


def per_pass(rows: Sequence[dict], key: str) -> list[float]:
    """Sum of one row field per pass, in pass order."""
    totals: dict[int, float] = {}
    for row in rows:
        totals[row["pass_index"]] = totals.get(row["pass_index"], 0) + row[key]
    return [totals[k] for k in sorted(totals)]


def stage_metrics(rows: Sequence[dict], walls: Sequence[float], overlapped: bool) -> dict[str, float]:
    """Stage shares and bandwidths over the decode passes, plus the cross-check of the timing itself.

    Without overlap the stages of a pass must add up to its wall time (`crosscheck_residual`,
    the worst pass); with prefetch, `overlap_efficiency` is the time hidden over the time that
    could have been hidden (the smaller of load and compute), averaged over passes.
    """
    passes = sorted({r["pass_index"] for r in rows})
    decode = [r for r in rows if r["pass_index"] != passes[0]] or list(rows)  # per token: skip the prefill
    totals = {stage: sum(r[f"{stage}_s"] for r in decode) for stage in STAGES}
    all_s = sum(totals.values())
    metrics: dict[str, float] = {}
    decode_passes = max(1, len({r["pass_index"] for r in decode}))
    for stage, seconds in totals.items():
        metrics[f"stage_{stage}_s"] = seconds / decode_passes
        if all_s > 0:
            metrics[f"stage_{stage}_share"] = seconds / all_s
    for issued in ("compute_issue_s", "load_issue_s"):
        metrics[issued] = sum(r[issued] for r in decode) / decode_passes
    for stage in LOAD_STAGES:
        moved = sum(r[f"{stage}_bytes"] for r in rows)
        spent = sum(r[f"{stage}_s"] for r in rows if r[f"{stage}_bytes"] > 0)
        if moved > 0 and spent > 0:
            metrics[f"{stage}_bandwidth_bytes_per_s"] = moved / spent
    by_stage = {stage: per_pass(rows, f"{stage}_s") for stage in STAGES}  # stage -> [seconds per pass]
    sums = [sum(pass_s) for pass_s in zip(*(by_stage[s] for s in STAGES), strict=True)]
    if not overlapped:
        metrics["crosscheck_residual"] = max(abs(w - s) / w for w, s in zip(walls, sums, strict=True) if w > 0)
    else:
        loads = [sum(pass_s) for pass_s in zip(*(by_stage[s] for s in LOAD_STAGES), strict=True)]
        ratios = []
        for wall, total, load in zip(walls, sums, loads, strict=True):
            hideable = min(load, total - load)
            if hideable > 0:
                ratios.append(min(1.0, max(0.0, (total - wall) / hideable)))
        if ratios:
            metrics["overlap_efficiency"] = sum(ratios) / len(ratios)
    return metrics
