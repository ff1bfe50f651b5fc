"""bench.profile: one generation more, after the measured ones, recorded by torch.profiler.

The profiler slows every op it records, so its generation is in none of the run's metrics. It leaves a
trace to open in Perfetto (ui.perfetto.dev) or chrome://tracing, with each unit's load, decode and compute
as named ranges on the thread that ran them (the prefetch worker's beside the main thread's), and the ops
that cost the most, by self time on the host and, on CUDA, on the device.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TypeVar

import torch
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger(__name__)

T = TypeVar("T")
TRACE_FILE = "trace.json.gz"
OPS_FILE = "ops.txt"
TOP_OPS = 25
STAGES = ("load", "decode", "compute")  # the named ranges, one of each per unit and pass
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace's categories for work on a CUDA stream
GAP_US = 50  # an idle stretch on a stream longer than this is a gap (a streamed layer's copy takes milliseconds)

# Set only while `record` runs: a named range costs microseconds even when no profiler records (three ranges a
# unit add up over a pass), and torch's own "is a profiler on" flag does not see
# one that records every thread.
_recording = False


def stage_range(stage: str, unit: str) -> AbstractContextManager[object]:
    """A range named `stage unit` ("compute layers.3") in the trace, while a profiled generation runs."""
    return record_function(f"{stage} {unit}") if _recording else nullcontext()


def _all_threads() -> dict[str, object]:
    """The profiler option that records every thread, not only the one that started it: the prefetch worker
    loads on a thread of its own, started before the profiler. Absent in older torch (the trace then lacks
    the worker's ops)."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except TypeError:
        log.warning("torch %s cannot profile every thread: the prefetch worker's loads are not in the trace",
                    torch.__version__)
        return {}


def record(run: Callable[[], T], device: torch.device, out_dir: Path) -> T:
    """`run()` under torch.profiler; its trace and its top ops go to `out_dir`. Returns what `run` returned."""
    global _recording
    cuda = device.type == "cuda"
    if cuda:
        # Kineto leaves CUPTI attached after the profile unless TEARDOWN_CUPTI=1, and later kernel launches in the
        # process keep paying for it (PyTorch issue #144455: training 10-20% slower after a profile). A sweep, and
        # the GPU check, run their jobs in one process. No CUDA graph runs here, the one case torch turns teardown
        # off for. A value the user set is kept.
        os.environ.setdefault("TEARDOWN_CUPTI", "1")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    t0 = time.perf_counter()
    _recording = True
    try:
        with profile(activities=activities, **_all_threads()) as prof:
            result = run()
            if cuda:
                torch.cuda.synchronize(device)  # the device's work in the trace, not only its launches
    finally:
        _recording = False
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: an interrupted profile leaves no empty folder
    prof.export_chrome_trace(str(out_dir / TRACE_FILE))
    text = summary(prof.key_averages(), cuda)
    if cuda:  # the trace's device events: whether the copy stream ever stood idle
        try:
            text += "\n" + streams_table(stream_use(json.loads(gzip.decompress((out_dir / TRACE_FILE).read_bytes()))))
        except Exception as exc:  # a trace shaped unlike torch's usual one costs this table, not the run
            log.exception("reading the streams' use from the trace failed")
            text += f"\nCUDA streams: not read from the trace ({type(exc).__name__}: {exc})\n"
    (out_dir / OPS_FILE).write_text(text, encoding="utf-8")
    log.info("profiled generation (%.1f s) written to %s", time.perf_counter() - t0, out_dir)
    return result


def summary(averages: EventList, cuda: bool) -> str:
    """The stages' ranges summed (host time in them, the part outside any op: Python, and on CUDA the device
    time of the kernels they launched), then the top ops (the ranges left out: they would crowd the ops out)."""
    lines = ["stage    ranges   host total   host outside ops" + ("   device total" if cuda else "")]
    for stage in STAGES:
        ranges = [e for e in averages if e.key.startswith(f"{stage} ")]
        row = (f"{stage:<8} {sum(e.count for e in ranges):>6} {_ms(e.cpu_time_total for e in ranges):>12}"
               f" {_ms(e.self_cpu_time_total for e in ranges):>18}")
        lines.append(row + (f" {_ms(e.device_time_total for e in ranges):>14}" if cuda else ""))
    ops = EventList([e for e in averages if e.key.split(" ")[0] not in STAGES])
    sorts = [("self time on the device", "self_device_time_total")] if cuda else []
    sorts.append(("self time on the host", "self_cpu_time_total"))
    for what, key in sorts:
        lines += ["", f"top {TOP_OPS} ops by {what}", ops.table(sort_by=key, row_limit=TOP_OPS)]
    return "\n".join(lines) + "\n"


def _ms(microseconds: Iterable[float]) -> str:
    return f"{sum(microseconds) / 1000:.1f} ms"


def stream_use(trace: dict) -> list[dict[str, float]]:
    """Per CUDA stream of a profiled generation, from its Chrome trace (times in us): how long the stream was busy
    (kernels and copies merged where they overlap) within the span of all device work, its kernels' and its
    copies' time, the bytes its copies moved, and its idle gaps over `GAP_US`. A copy stream busy for nearly the
    whole span is at the floor; its gaps are where the copies waited on something else."""
    by_stream: dict[int, list[dict]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENTS:
            by_stream.setdefault(int(e.get("args", {}).get("stream", e.get("tid", -1))), []).append(e)
    if not by_stream:
        return []
    every = [e for events in by_stream.values() for e in events]
    span = max(e["ts"] + e["dur"] for e in every) - min(e["ts"] for e in every)
    rows = []
    for stream, events in sorted(by_stream.items()):
        merged: list[list[float]] = []
        for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        busy = sum(end - start for start, end in merged)
        gaps = [later[0] - earlier[1] for earlier, later in zip(merged, merged[1:], strict=False)]
        copies = [e for e in events if e["cat"] == "gpu_memcpy"]
        long_gaps = [g for g in gaps if g > GAP_US]
        rows.append({
            "stream": stream, "busy_us": busy, "share": busy / span if span else 0.0,
            "kernel_us": sum(e["dur"] for e in events if e["cat"] == "kernel"),
            "copy_us": sum(e["dur"] for e in copies),
            "copy_bytes": float(sum(e.get("args", {}).get("bytes", 0) for e in copies)),
            "gaps": len(long_gaps), "gap_us": sum(long_gaps),
        })
    return rows


def streams_table(rows: list[dict[str, float]]) -> str:
    if not rows:
        return "no device work in the trace\n"
    lines = [f"CUDA streams (busy: kernels and copies merged; gaps: idle over {GAP_US} us)",
             "stream        busy   share      kernels       copies     copied    copy rate   gaps (total)"]
    for r in rows:
        rate = f"{r['copy_bytes'] / r['copy_us'] / 1e3:.1f} GB/s" if r["copy_us"] else "–"
        lines.append(
            f"{int(r['stream']):<6} {_ms([r['busy_us']]):>11} {r['share']:>7.0%} {_ms([r['kernel_us']]):>12}"
            f" {_ms([r['copy_us']]):>12} {r['copy_bytes'] / 1e9:>7.2f} GB {rate:>12}"
            f"   {int(r['gaps'])} ({_ms([r['gap_us']])})"
        )
    return "\n".join(lines) + "\n"
