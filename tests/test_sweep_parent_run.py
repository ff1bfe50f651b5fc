"""harness.sweep: the Hydra callback's MLflow parent run, opened before the jobs and closed once after them,
FAILED when a job failed; the runs are named by what differs.

Every store is a SQLite file under a pytest tmp dir, read back with a plain MlflowClient.
"""

from __future__ import annotations

import atexit
import pickle
import subprocess
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow_runs import _client, _runs
from omegaconf import OmegaConf
from sweep_app import _start_sweep

from harness.sweep import MlflowSweepCallback, parent_run_id_for_job
from harness.tracking.client import default_tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store per module: creating a SQLite store runs MLflow's migrations (~2 s each).
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


def test_parent_run_id_outside_hydra_is_none() -> None:
    assert parent_run_id_for_job() is None


def _sweep_config(tmp_path: Path, uri: str, *, enabled: bool = True):
    return OmegaConf.create(
        {
            "tracking": {"enabled": enabled, "uri": uri, "experiment": "callback"},
            "paths": {"outputs": str(tmp_path / "outputs")},
            "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"task": ["x=1,2"]}},
        }
    )


def _job_return(status: JobStatus, overrides: list[str], value: object) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=status)
    ret.return_value = value
    return ret


def test_callback_closes_parent_once_at_exit(store: str, tmp_path: Path) -> None:
    # The BasicSweeper failure path, in process: jobs end, on_multirun_end never comes.
    callback = MlflowSweepCallback()
    config = _sweep_config(tmp_path, store)
    callback.on_multirun_start(config)
    try:
        parent_id = (tmp_path / "sweep" / "mlflow_parent_run_id").read_text().strip()
        callback.on_job_end(config, _job_return(JobStatus.COMPLETED, ["x=1"], None))
        callback.on_job_end(config, _job_return(JobStatus.FAILED, ["x=2"], ValueError("bad x")))
        callback._close_at_exit()
        callback._close_at_exit()
        # Process-based launchers pickle callbacks; the copy must not carry the parent run along.
        assert pickle.loads(pickle.dumps(callback)).tracker is None
    finally:
        atexit.unregister(callback._close_at_exit)

    run = _client(store).get_run(parent_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "sweep x (2) sweep"
    assert run.data.tags["failure_reason"] == "1 of 2 jobs failed"
    assert run.data.tags["layerbench.failed_jobs"] == "x=2: ValueError: bad x"
    assert run.data.tags["layerbench.role"] == "parent"
    assert run.data.tags["hydra.overrides"] == "x=1,2"
    assert "version.python" in run.data.tags


def test_callback_disabled_removes_stale_parent_id(store: str, tmp_path: Path) -> None:
    stale = tmp_path / "sweep" / "mlflow_parent_run_id"
    stale.parent.mkdir()
    stale.write_text("0123456789abcdef\n")
    callback = MlflowSweepCallback()
    config = _sweep_config(tmp_path, store, enabled=False)
    callback.on_multirun_start(config)
    callback.on_job_end(config, _job_return(JobStatus.COMPLETED, ["x=1"], None))
    callback.on_multirun_end(config)
    assert not stale.exists()
    assert callback.tracker is None


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Both sweeps at once: each spends seconds importing mlflow and creating its store."""
    root = tmp_path_factory.mktemp("sweeps")
    uri = default_tracking_uri(root / "failing" / "store")
    started = {
        # A failing job, explicit tracking.uri and an absolute sweep dir.
        "failing": _start_sweep(
            root / "failing",
            "x=1,2,3",
            "fail_on=2",
            f"tracking.uri='{uri}'",
            f"hydra.sweep.dir='{root / 'failing' / 'multirun'}'",
        ),
        # Default uri from a relative paths.outputs, with jobs chdir'd into their own directories:
        # parent and children must still agree on one store and on the parent id file.
        "succeeding": _start_sweep(
            root / "succeeding", "x=1,2", "hydra.job.chdir=true", "hydra.sweep.dir=multirun/s"
        ),
    }
    results = {}
    for name, process in started.items():
        try:
            output, _ = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        results[name] = (process.returncode, output, root / name)
    return results


def test_sweep_with_failing_job_closes_parent_failed(sweeps: dict[str, tuple[int, str, Path]]) -> None:
    returncode, output, cwd = sweeps["failing"]
    uri = default_tracking_uri(cwd / "store")
    sweep_dir = cwd / "multirun"
    # Hydra re-raises the failed job's exception after the batch: the process fails.
    assert returncode != 0, output
    assert "job failed on purpose" in output

    client = _client(uri)
    parents = _runs(client, "sweep", "tags.`layerbench.role` = 'parent'")
    assert len(parents) == 1, output
    parent = parents[0]
    assert (sweep_dir / "mlflow_parent_run_id").read_text().strip() == parent.info.run_id
    assert parent.info.status == "FAILED", output
    assert parent.info.end_time is not None
    assert parent.data.tags["failure_reason"] == "1 of 3 jobs failed"
    assert parent.data.tags["hydra.overrides"] == "x=1,2,3 fail_on=2 tracking.uri='" + uri + "'"
    assert parent.data.tags["hydra.sweep_dir"] == str(sweep_dir)

    children = _runs(client, "sweep", f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    statuses = {run.info.run_name: run.info.status for run in children}
    assert statuses == {"x=1": "FINISHED", "x=2": "FAILED", "x=3": "FINISHED"}
    failed = next(run for run in children if run.info.run_name == "x=2")
    assert failed.data.tags["failure_reason"] == "x=2 is the failing value"
    assert len(_runs(client, "sweep")) == 4


def test_sweep_all_succeed_closes_parent_finished(sweeps: dict[str, tuple[int, str, Path]]) -> None:
    returncode, output, cwd = sweeps["succeeding"]
    assert returncode == 0, output

    uri = default_tracking_uri(cwd / "outputs")
    client = _client(uri)
    parents = _runs(client, "sweep", "tags.`layerbench.role` = 'parent'")
    assert len(parents) == 1, output
    parent = parents[0]
    assert parent.info.status == "FINISHED", output
    assert "failure_reason" not in parent.data.tags
    assert parent.info.run_name == "sweep x (2) s", "named by what it varies, how many jobs, and its folder"
    children = _runs(client, "sweep", f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["x=1", "x=2"]
    assert all(run.info.status == "FINISHED" for run in children)
    # The parent holds the answer: the comparison, fastest first, and the settings the jobs shared.
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= arts, arts
    assert "timelines.png" not in arts, "these children logged no timeline: none is drawn"
    note = parent.data.tags["mlflow.note.content"]
    # These children logged one value each and no samples: ranked by mean, and said to have no interval.
    assert note.startswith("**Fastest by mean: x=1**") and "slowest: x=2, 2.00x (no interval) that time" in note
    assert parent.data.params["fail_on"] == "-1" and "x" not in parent.data.params
    assert not (cwd / "mlruns").exists()


def test_runs_are_named_by_what_differs() -> None:
    from omegaconf import OmegaConf

    from harness.sweep import job_run_name, sweep_keys_and_size

    groups = ("model", "cache", "compression", "prefetch", "kv_cache")
    sweep = OmegaConf.create({"hydra": {
        "overrides": {"task": ["compression=none,8bit,4bit", "cache=disk,ram", "workload.max_new_tokens=8"]},
        "sweeper": {"params": {"prefetch": "off,on"}},
    }})
    assert sweep_keys_and_size(sweep) == (["compression", "cache", "prefetch"], 12)
    job = ["compression=4bit", "cache=ram", "workload.max_new_tokens=8", "prefetch=on"]
    assert job_run_name(job, groups, ["compression", "cache", "prefetch"]) == "4bit·ram·on"
    # Standalone: the options chosen on the command line, or "default".
    assert job_run_name(["compression=4bit", "cache=disk", "workload.prompt=hi"], groups, None) == "4bit·disk"
    assert job_run_name(["workload.max_new_tokens=3", "+experiment=perf"], groups, None) == "default"
    assert job_run_name([], groups, None) == "default"



def test_a_sweep_killed_outright_leaves_its_parent_and_running_job_killed(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives the sweep's process no chance to close its runs: its watchdog does."""
    import time

    from harness.files import exclusive_lock

    sweep = _start_sweep(tmp_path, "x=1,2", "sleep_s=600", "tracking.experiment=killed")
    db = tmp_path / "outputs" / "mlflow.db"
    deadline, client, running = time.monotonic() + 120, None, []
    while len(running) < 2 and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.5)
        if client is None and db.exists():
            with exclusive_lock(db.with_name(db.name + ".lock")):  # never while the sweep creates the store
                client = _client(f"sqlite:///{db}")
        if client is not None and client.get_experiment_by_name("killed") is not None:
            running = _runs(client, "killed", "attributes.status = 'RUNNING'")  # the parent and job x=1
    assert len(running) == 2, sweep.communicate(timeout=60)[0][-3000:] if sweep.poll() is not None else "no runs"
    sweep.kill()
    sweep.wait(timeout=60)
    while _runs(client, "killed", "attributes.status = 'RUNNING'") and time.monotonic() < deadline:
        time.sleep(0.5)
    runs = {run.info.run_name: run for run in _runs(client, "killed")}
    (parent_name,) = [name for name in runs if name.startswith("sweep")]
    assert {name: run.info.status for name, run in runs.items()} == {parent_name: "KILLED", "x=1": "KILLED"}
    assert "ended without closing it: killed, or out of memory" in runs[parent_name].data.tags["failure_reason"]
    assert "its sweep's process ended" in runs["x=1"].data.tags["failure_reason"]
