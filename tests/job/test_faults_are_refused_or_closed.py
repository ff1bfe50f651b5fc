"""Faults a hostile user found (issue #12): each is refused clearly, or closes what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from alembic.util.exc import CommandError
from mlflow import MlflowClient
from sqlalchemy.exc import OperationalError

from harness.config import Config
from harness.files import exclusive_lock
from harness.job.run import run_job
from harness.runners.layerbench.setup import build_setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("runner", ["layerbench", "transformers"])
def test_a_workload_longer_than_the_models_positions_is_refused_before_the_split(
    runner: str, make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    # The tiny model has 2,048 positions; the split root is fresh, so a split would show as files.
    cfg = make_cfg(f"runner={runner}", "workload.max_new_tokens=100000", f"split.dir={tmp_path / 'splits'}")
    with pytest.raises(ValueError, match=r"over model 'tiny''s maximum of 2048 .*workload.max_new_tokens <= 20\d\d"):
        run_job(cfg, {}, choices={"runner": runner}, overrides=[f"runner={runner}"])
    assert not (tmp_path / "splits").exists()
    long_prompt = make_cfg("workload.prompt_tokens=2040", "workload.max_new_tokens=9", f"split.dir={tmp_path / 's'}")
    with pytest.raises(ValueError, match=r"the prompt \(2040 tokens\)"):
        build_setup(long_prompt, Path(long_prompt.paths.outputs), torch.device("cpu"))


@pytest.mark.parametrize(
    ("sig", "group", "reason"),
    [
        (signal.SIGTERM, False, "Terminated: SIGTERM"),
        # Ctrl-C in a terminal reaches the whole process group: the tracking process too, which must outlive it.
        (signal.SIGINT, True, "KeyboardInterrupt"),
        # Nothing of the job runs on: its tracking process sees the pipe close and ends the run.
        (signal.SIGKILL, False, "ended without closing it: killed, or out of memory"),
    ],
    ids=["sigterm", "ctrl-c", "sigkill"],
)
def test_a_stopped_job_closes_its_run_killed_with_the_reason(
    tmp_path: Path, sig: signal.Signals, group: bool, reason: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Long enough to be caught mid-generation: no KV cache, so each token recomputes the whole sequence.
    cmd = [sys.executable, "-m", "harness", f"paths.outputs={tmp_path}", "kv_cache=none", "probe.enabled=false",
           "workload.max_new_tokens=2000", "workload.stop_at_eos=false"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    db = tmp_path / "mlflow.db"
    client = None
    deadline = time.monotonic() + 300
    running = []
    while not running and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if client is None and db.exists():
            # Opened once the job has made the store, through the lock it makes it under: MlflowClient opens the
            # store as it is built, and built first it created the tables while the job did (CI saw the job exit 1).
            with exclusive_lock(db.with_name(db.name + ".lock")):
                client = MlflowClient(f"sqlite:///{db}")
        try:
            experiment = client.get_experiment_by_name("layerbench") if client is not None else None
        except (OperationalError, CommandError):  # this client met the job creating the store's tables
            continue
        if experiment is not None:
            running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    early = proc.communicate(timeout=60)[1][-3000:] if not running and proc.poll() is not None else ""
    assert running, f"the job never started its run: {proc.poll()=}\n{early}"
    time.sleep(2)  # into the generation
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "a stopped job must not exit 0"
    run = client.get_run(running[0].info.run_id)
    while run.info.status == "RUNNING" and time.monotonic() < deadline:  # SIGKILL: the tracking process ends it
        time.sleep(0.5)
        run = client.get_run(running[0].info.run_id)
    assert run.info.status == "KILLED", stderr[-2000:]
    assert reason in run.data.tags["failure_reason"]


def test_a_job_made_to_exit_closes_its_run_killed(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker whose sweep's driver is gone exits with SystemExit raised in its task: stopped from outside,
    like SIGTERM, not failed (CI once saw one of two such jobs end FAILED, the other KILLED by the parent)."""
    import harness.job.run as run_module

    def exit_mid_run(*args: object, **kwargs: object) -> None:
        raise SystemExit("the worker is exiting")

    monkeypatch.setattr(run_module, "measure", exit_mid_run)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", "probe.enabled=false")
    with pytest.raises(SystemExit):
        run_module.run_job(cfg, {}, choices={"model": "tiny"}, overrides=[])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "SystemExit: the worker is exiting"


def test_schemas_are_no_options() -> None:
    from hydra.errors import MissingConfigException

    from harness.compose import compose_config

    with pytest.raises(MissingConfigException, match="compression/base_none"):
        compose_config(["compression=base_none"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "harness", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    groups = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and "," in line)
    assert groups["compression"] == "4bit, 8bit, none"
    assert groups["runner"] == "accelerate, airllm, layerbench, transformers"
    assert not any("base_" in options for options in groups.values()), groups


def test_two_sweeps_in_one_folder_and_a_fresh_store_each_get_their_own_parent(tmp_path: Path) -> None:
    from sweep_app import _start_sweep  # tests/ is on sys.path (the rootdir conftest's folder)

    # Same cwd, same sweep folder, same fresh SQLite store, started together.
    shared = ["hydra.sweep.dir=multirun/same", "tracking.experiment=sweep"]
    first = _start_sweep(tmp_path, "x=1,2", *shared)
    second = _start_sweep(tmp_path, "x=3,4", *shared)
    for process in (first, second):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags.get("layerbench.role") == "parent"}
    assert len(parents) == 2 and all(client.get_run(p).info.status == "FINISHED" for p in parents)
    by_parent: dict[str, set[str]] = {}
    for run in runs:
        if run.data.tags.get("layerbench.role") == "child":
            by_parent.setdefault(run.data.tags["mlflow.parentRunId"], set()).add(run.data.params["x"])
    assert sorted(by_parent.values(), key=sorted) == [{"1", "2"}, {"3", "4"}] and set(by_parent) == parents


def test_a_parent_that_cannot_be_created_fails_the_sweep(tmp_path: Path) -> None:
    from sweep_app import _start_sweep  # tests/ is on sys.path (the rootdir conftest's folder)

    # A tracking URI whose store cannot exist: a file stands where its folder would be.
    (tmp_path / "blocked").write_text("not a folder")
    proc = _start_sweep(tmp_path, "x=1,2", f"tracking.uri=sqlite:///{tmp_path}/blocked/mlflow.db")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "parent run could not be created" in output


def test_what_needs_a_direct_split_models_weights_is_refused_before_its_run_exists(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for option, refusal in (("quality.enabled=true", "set quality.enabled=false"),
                            ("reference.enabled=true", "set reference.enabled=false")):
        cfg = make_cfg("model=llama3-70b-synthetic", "compression=4bit", "quality.enabled=false", option,
                       "tracking.enabled=true", f"tracking.uri={uri}", f"paths.outputs={tmp_path}")
        with pytest.raises(ValueError, match=refusal):
            run_job(cfg, {}, choices={}, overrides=[])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()
