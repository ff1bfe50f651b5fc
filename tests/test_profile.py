"""bench.profile: one generation more under torch.profiler, in none of the run's metrics."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

import strategies.prefetch.on
from harness.config import Config
from harness.job.run import run_job
from harness.measurement.profile import OPS_FILE, TRACE_FILE, stage_range


def trace_events(path: Path) -> list[dict]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def test_a_profiled_layerbench_run_traces_each_stage_on_its_own_thread_and_logs_it(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every load on the worker (no unit is fast enough to load in turn): the trace must show the worker's thread.
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


def test_a_job_that_fails_leaves_no_empty_profile_folder(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("bench.profile=true", f"paths.outputs={tmp_path}", "model=local", f"model.path={tmp_path / 'none'}")
    with pytest.raises(Exception, match="none"):
        run_job(cfg, {}, choices={"model": "local"}, overrides=[], console=Console(quiet=True))
    assert not any((tmp_path / "profiles").iterdir())
