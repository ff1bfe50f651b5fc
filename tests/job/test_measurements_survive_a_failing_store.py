"""A store that fails mid-run (its tracking process dies, its disk fills, another program locks it) loses
nothing measured: the job's record holds it all, the summary is printed, and one message says how to log it."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

import harness.job.run as run_module
from harness.config import Config
from harness.report.importing import import_record
from harness.tracking.client import RunTracker
from harness.tracking.process import TrackerProcess
from harness.tracking.record import RECORD_FILE, RunRecord, TrackingFailed

ROOT = Path(__file__).resolve().parents[2]
JOB = ("probe.enabled=false", "reference.enabled=false", "quality.enabled=false", "workload.max_new_tokens=4")


def measuring_then(monkeypatch: pytest.MonkeyPatch, fault: Callable[[], None]) -> None:
    """The job measures as always, then `fault` strikes the store before anything is logged."""
    measure = run_module.measure

    def measure_then_fault(*args: object, **kwargs: object) -> object:
        outcome = measure(*args, **kwargs)
        fault()
        return outcome

    monkeypatch.setattr(run_module, "measure", measure_then_fault)


def only_record(outputs: Path) -> RunRecord:
    (folder,) = (outputs / "records").iterdir()
    return RunRecord.load(folder)


def test_a_dead_tracking_process_loses_nothing_and_the_record_imports_whole(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", f"paths.outputs={tmp_path}", *JOB)
    tracker = TrackerProcess(uri, "layerbench")
    measuring_then(monkeypatch, lambda: os.kill(tracker._child.pid, signal.SIGKILL))
    out = io.StringIO()
    try:
        with pytest.raises(TrackingFailed) as failed:
            run_module.run_job(cfg, {}, choices={"model": "tiny"}, overrides=[], tracker=tracker,
                               console=Console(file=out, width=120))
    finally:
        tracker.close()
    record = only_record(tmp_path)
    message = str(failed.value)
    assert "tracking process exited" in message and uri in message
    assert f"python -m harness.report --import {record.folder}" in message
    assert "per-token latency" in out.getvalue()  # the summary, printed although logging failed
    measured = record.data["metrics"]
    assert measured["tpot_s"] > 0 and record.data["status"] == "FINISHED" and not record.data["logged"]
    assert (record.folder / "artifacts" / "summary.txt").read_text().count("per-token latency (mean)") == 1
    run_id, _ = import_record(record.folder, None, None)
    assert run_id == record.run_id  # the run the job started, completed
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {k: v for k, v in run.data.metrics.items() if k in measured} == measured


def test_a_store_locked_for_a_while_is_retried_and_the_run_logged(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri=sqlite:///{db}", f"paths.outputs={tmp_path}", *JOB)
    released = threading.Event()

    def lock_for_a_while() -> None:
        holder = sqlite3.connect(db, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")  # as another program's long write transaction

        def release() -> None:
            time.sleep(23)  # past MLflow's 20 s wait for SQLite's lock: one call fails and is retried
            holder.rollback()
            holder.close()
            released.set()

        threading.Thread(target=release, daemon=True).start()

    measuring_then(monkeypatch, lock_for_a_while)
    report = run_module.run_job(cfg, {}, choices={"model": "tiny"}, overrides=[], console=Console(file=io.StringIO()))
    assert released.is_set() and report is not None
    assert any("database is locked" in r.getMessage() and "trying again" in r.getMessage() for r in caplog.records)
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["tpot_s"] == report.tpot_s


def test_a_full_disk_gives_up_after_the_retry_time_with_one_message(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", f"paths.outputs={tmp_path}",
                   "tracking.retry_s=1", *JOB)
    calls = []

    def disk_full(self: RunTracker, *args: object, **kwargs: object) -> None:
        calls.append(1)
        raise OperationalError("INSERT INTO metrics ...", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(RunTracker, "log_metrics", disk_full)
    with pytest.raises(TrackingFailed, match=r"database or disk is full\)\. Everything measured is in .*record"):
        run_module.run_job(cfg, {}, choices={"model": "tiny"}, overrides=[], console=Console(file=io.StringIO()))
    assert len(calls) >= 2  # retried within the second it had
    record = only_record(tmp_path)
    assert record.data["metrics"]["tpot_s"] > 0 and not record.data["logged"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert run.info.status == "FAILED" and str(record.folder) in run.data.tags["failure_reason"]


def test_the_cli_says_what_was_lost_in_one_message_when_its_tracking_process_dies(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "harness", f"paths.outputs={tmp_path}", "kv_cache=none", "probe.enabled=false",
           "workload.max_new_tokens=300", "workload.stop_at_eos=false", "tracking.retry_s=2"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, tracker_pid = time.monotonic() + 120, None
    while tracker_pid is None and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == job.pid and b"harness.tracking.process" in cmdline:
                tracker_pid = int(stat.parent.name)
    assert tracker_pid is not None, "the job's tracking process never started"
    # The job saves the run's id in its record once the tracking process has created the run and logged its
    # params and tags: killing the process before that would fail the start, not the logging after measuring.
    started = False
    while not started and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.5)
        started = any(RunRecord.load(path.parent).data["run_id"] for path in tmp_path.rglob(RECORD_FILE))
    assert started, "the job never started its run"
    os.kill(tracker_pid, signal.SIGKILL)  # mid-generation: the run exists, nothing is logged yet
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 1, stderr[-3000:]
    assert "per-token latency" in stdout  # the summary
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]
    (last,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "the MLflow tracking process exited" in last and "python -m harness.report --import" in last
    folder = Path(last.rsplit("--import ", 1)[1])
    assert RunRecord.load(folder).data["metrics"]["tpot_s"] > 0
