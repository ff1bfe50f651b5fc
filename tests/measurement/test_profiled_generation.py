"""bench.profile: one generation more under torch.profiler, in none of the run's metrics."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

import strategies.prefetch.on
from harness.config import Config
from harness.job.run import run_job
from harness.measurement.profile import OPS_FILE, TRACE_FILE, stage_range, stream_use, streams_table


def trace_events(path: Path) -> list[dict]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def test_a_profiled_layerbench_run_traces_each_stage_on_its_own_thread_and_logs_it(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every load on the worker (no unit is fast enough to load in turn): the trace must show the worker's thread.
    from mlflow import MlflowClient  # here, not at the top: the GPU check runs this file's gpu test without MLflow

    monkeypatch.setattr(strategies.prefetch.on, "INLINE_BELOW_S", 0.0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("compression=8bit", "prefetch=on", "bench.profile=true", "workload.max_new_tokens=3",
                   "workload.stop_at_eos=false", "tracking.enabled=true", f"tracking.uri={uri}")
    report = run_job(cfg, {}, choices={"compression": "8bit", "prefetch": "on"}, overrides=[],
                     console=Console(quiet=True))
    assert report.new_tokens == 3
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    folder = Path(run.data.tags["profile.dir"])
    assert folder.parent.name == "profiles"  # outside Hydra: a folder of its own under outputs/profiles
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "profile")) == [
        f"profile/{OPS_FILE}", f"profile/{TRACE_FILE}"]
    # The run's timeline is the measured generation's alone: 3 passes, the profiled one in no metric.
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        run.info.run_id, "timeline.csv", str(tmp_path / "dl"))).read_text())))
    assert sorted({int(r["pass_index"]) for r in rows}) == [0, 1, 2]

    events = trace_events(folder / TRACE_FILE)
    threads: dict[str, set[int]] = {}
    for e in events:
        if e.get("ph") == "X" and e["name"].split(" ")[0] in ("load", "decode", "compute"):
            threads.setdefault(e["name"], set()).add(e["tid"])
    units = {r["unit"] for r in rows} - {"rope+mask"}  # every unit the runner streams
    assert len(units) == 7 and {f"compute {u}" for u in units} == {n for n in threads if n.startswith("compute")}
    main = set.union(*(threads[f"compute {u}"] for u in units))
    assert len(main) == 1
    for unit in units:
        # Loaded and decoded by the worker, computed on the main thread, once a pass (3 passes).
        assert threads[f"load {unit}"] == threads[f"decode {unit}"] and not threads[f"load {unit}"] & main, unit
        assert sum(1 for e in events if e.get("name") == f"compute {unit}") == 3
    ops = (folder / OPS_FILE).read_text()
    stages = dict(line.split(maxsplit=1) for line in ops.splitlines()[1:4])
    assert list(stages) == ["load", "decode", "compute"] and all(v.startswith("21 ") for v in stages.values())
    top = ops.split("top 25 ops by self time on the host")[1]
    assert "aten::" in top and "compute layers" not in top


def test_a_profiled_peer_run_writes_its_ops(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("runner=transformers", "bench.profile=true", "workload.max_new_tokens=3")
    report = run_job(cfg, {}, choices={"model": "tiny", "runner": "transformers"}, overrides=["runner=transformers"],
                     console=Console(quiet=True))
    assert report.new_tokens == 3
    folder = max((Path(cfg.paths.outputs) / "profiles").iterdir(), key=lambda p: p.stat().st_mtime)
    assert "aten::" in (folder / OPS_FILE).read_text()
    assert any(e.get("name") == "aten::linear" for e in trace_events(folder / TRACE_FILE))


def test_stage_ranges_cost_nothing_unless_a_profile_records() -> None:
    from contextlib import nullcontext

    assert isinstance(stage_range("compute", "layers.0"), nullcontext)


@pytest.mark.gpu
def test_a_profiled_cuda_run_traces_kernels_and_copies_on_the_device(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("device=cuda", "compression=4bit", "prefetch=on", "bench.profile=true",
                   "workload.max_new_tokens=3", "workload.stop_at_eos=false")
    report = run_job(cfg, {}, choices={"compression": "4bit", "prefetch": "on"}, overrides=[],
                     console=Console(quiet=True))
    assert report.new_tokens == 3
    folder = max((Path(cfg.paths.outputs) / "profiles").iterdir(), key=lambda p: p.stat().st_mtime)
    ops = (folder / OPS_FILE).read_text()
    assert ops.splitlines()[0].endswith("device total") and "top 25 ops by self time on the device" in ops
    categories = {e.get("cat") for e in trace_events(folder / TRACE_FILE)}
    assert {"kernel", "gpu_memcpy"} <= categories, categories
    # The streams' use, read back from the trace: prefetch=on copies on a stream of its own, kernels on others.
    rows = stream_use({"traceEvents": trace_events(folder / TRACE_FILE)})
    assert any(r["copy_bytes"] > 0 and r["kernel_us"] == 0 for r in rows), rows
    assert len([r for r in rows if r["kernel_us"] > 0]) >= 2, "decode and compute on streams of their own"
    assert "CUDA streams" in ops


def test_each_streams_busy_time_copies_and_gaps_are_read_from_the_trace() -> None:
    """A made-up trace (us): stream 7 computes 0-100 and 160-250 with an overlapping kernel at 90-120; stream 13
    copies 2 MB at 0-200 and 1 MB at 230-260. Host events (no device category) are not a stream's."""
    def event(cat: str, ts: float, dur: float, stream: int, **args: float) -> dict:
        return {"ph": "X", "cat": cat, "name": cat, "ts": ts, "dur": dur, "tid": stream,
                "args": {"stream": stream, **args}}

    trace = {"traceEvents": [
        event("kernel", 0, 100, 7), event("kernel", 90, 30, 7), event("kernel", 160, 90, 7),
        event("gpu_memcpy", 0, 200, 13, bytes=2e6), event("gpu_memcpy", 230, 30, 13, bytes=1e6),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 400, "tid": 1},
    ]}
    seven, thirteen = stream_use(trace)
    assert seven == {"stream": 7, "busy_us": 210, "share": 210 / 260, "kernel_us": 220, "copy_us": 0,
                     "copy_bytes": 0.0, "gaps": 0, "gap_us": 0}  # 40 us idle: under GAP_US
    assert thirteen == {"stream": 13, "busy_us": 230, "share": 230 / 260, "kernel_us": 0, "copy_us": 230,
                        "copy_bytes": 3e6, "gaps": 0, "gap_us": 0}
    wide = stream_use({"traceEvents": [event("kernel", 0, 10, 3), event("kernel", 100, 10, 3)]})
    assert (wide[0]["gaps"], wide[0]["gap_us"]) == (1, 90)
    table = streams_table([seven, thirteen])
    assert "13" in table and "13.0 GB/s" in table and "81%" in table  # 3 MB in 230 us; 210 of 260 us busy
    assert stream_use({"traceEvents": trace["traceEvents"][-1:]}) == [] and "no device work" in streams_table([])


def test_a_job_that_fails_leaves_no_empty_profile_folder(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("bench.profile=true", f"paths.outputs={tmp_path}", "model=local", f"model.path={tmp_path / 'none'}")
    with pytest.raises(Exception, match="none"):
        run_job(cfg, {}, choices={"model": "local"}, overrides=[], console=Console(quiet=True))
    assert not any((tmp_path / "profiles").iterdir())
