"""harness.tracking.record: a run written to its folder first, replayed into a store with bounded retries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow_runs import _client

from harness.report.fetch import ReportError
from harness.report.importing import import_record
from harness.tracking.client import RunTracker, default_tracking_uri
from harness.tracking.record import PermanentStoreError, RunRecord, TrackingFailed, replay, retried


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


def finished_record(folder: Path, uri: str | None) -> RunRecord:
    record = RunRecord(folder, uri=uri, experiment="records")
    record.start(run_name="4bit·ram", params={"compression": "4bit"}, tags={"hw.cpu": "test cpu"})
    record.log_metrics({"tpot_s": 0.25, "absent": None})
    record.log_series("token_latency_s", [0.5, None, 0.25], first_step=2)
    record.log_dict({"text": "héllo", "ids": [1, 2]}, "generation.json")
    record.log_dict({"model": {"name": "tiny"}}, "config.yaml")
    plot = folder.parent / "plot.png"
    plot.write_bytes(b"\x89PNG")
    record.log_artifact(plot, "plots")
    record.end("FINISHED")
    return record


def test_a_record_holds_every_call_on_disk_and_loads_back(tmp_path: Path) -> None:
    record = finished_record(tmp_path / "record", None)
    loaded = RunRecord.load(tmp_path)  # the job's folder, which holds record/
    assert loaded.data["metrics"] == {"tpot_s": 0.25}
    assert loaded.data["series"]["token_latency_s"]["values"] == [0.5, None, 0.25]
    assert json.loads((tmp_path / "record/artifacts/generation.json").read_text())["text"] == "héllo"
    assert (tmp_path / "record/artifacts/plots/plot.png").read_bytes() == b"\x89PNG"
    assert loaded.ended and loaded.data["params"] == record.data["params"]


def test_a_record_replayed_into_a_store_is_the_run_the_job_would_have_logged(tmp_path: Path, store: str) -> None:
    record = finished_record(tmp_path / "record", store)
    tracker = RunTracker(store, "records")
    replay(record, tracker, retry_s=0, started=False)
    run = _client(store).get_run(str(tracker.run_id))
    assert run.info.status == "FINISHED" and run.info.run_name == "4bit·ram"
    assert run.data.params == {"compression": "4bit"} and run.data.tags["hw.cpu"] == "test cpu"
    assert [(m.step, m.value) for m in _client(store).get_metric_history(run.info.run_id, "token_latency_s")] == [
        (2, 0.5), (4, 0.25)
    ]
    artifacts = {a.path for a in _client(store).list_artifacts(run.info.run_id)}
    assert artifacts == {"generation.json", "config.yaml", "plots"}
    assert RunRecord.load(tmp_path).data["logged"]


def test_a_failing_store_is_retried_until_it_takes_the_call(tmp_path: Path) -> None:
    record, calls = RunRecord(tmp_path), []

    def locked_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "logged"

    assert retried(locked_twice, float("inf"), None, record) == "logged" and len(calls) == 3


def test_a_store_that_keeps_failing_gives_up_naming_the_store_the_record_and_the_import(tmp_path: Path) -> None:
    record = RunRecord(tmp_path / "record")

    def full_disk() -> None:
        raise OSError(28, "database or disk is full\n[SQL: INSERT INTO metrics ...]")

    with pytest.raises(TrackingFailed) as failed:
        retried(full_disk, 0.0, "sqlite:////data/mlflow.db", record)
    message = str(failed.value)
    assert "sqlite:////data/mlflow.db" in message and "database or disk is full" in message
    assert "SQL" not in message  # one line of the library's error, not its statement
    assert f"python -m harness.report --import {tmp_path / 'record'}" in message


def test_a_tracking_process_that_exited_is_not_retried(tmp_path: Path) -> None:
    calls = []

    def exited() -> None:
        calls.append(1)
        raise PermanentStoreError("the MLflow tracking process exited (code -9)")

    with pytest.raises(TrackingFailed, match="exited.*Nothing was measured yet"):
        retried(exited, float("inf"), None, None)
    assert len(calls) == 1


def test_import_completes_the_run_its_job_left_open_and_refuses_a_second_import(tmp_path: Path, store: str) -> None:
    # The job started its run, then its store failed: the run is RUNNING with its params and no metrics.
    tracker = RunTracker(store, "records")
    run_id = tracker.start(run_name="4bit·ram", params={"compression": "4bit"}, tags={})
    record = finished_record(tmp_path / "record", store)
    record.data["run_id"] = run_id
    record.save()
    assert import_record(tmp_path, None, None) == (run_id, store)
    run = _client(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["tpot_s"] == 0.25
    assert run.data.tags["layerbench.imported_from"] == str(tmp_path / "record")
    with pytest.raises(ReportError, match="was logged already"):
        import_record(tmp_path, None, None)


def test_import_refuses_what_holds_no_finished_record(tmp_path: Path, store: str) -> None:
    with pytest.raises(ReportError, match="does not exist: name a job's folder"):
        import_record(tmp_path, store, None)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot be read as a run's record"):
        import_record(tmp_path, store, None)
    running = RunRecord(tmp_path / "killed", uri=store)
    running.start(run_name="x", params={}, tags={})
    with pytest.raises(ReportError, match="never ended"):
        import_record(tmp_path / "killed", None, None)
