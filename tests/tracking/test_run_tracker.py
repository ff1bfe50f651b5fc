"""harness.tracking: RunTracker round trips, in this process or its own, and the SQLite store it opens.

Every store is a SQLite file under a pytest tmp dir, read back with a plain MlflowClient.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow_runs import _client, _runs
from omegaconf import OmegaConf

from harness.tracking.client import RunTracker, default_tracking_uri, flatten


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store per module: creating a SQLite store runs MLflow's migrations (~2 s each).
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


def test_flatten_nested_dicts_and_lists() -> None:
    nested = {
        "model": {"name": "tiny", "config_overrides": {}, "layers": [1, {"k": None}]},
        "tags": [],
        "seed": 0,
        "flag": True,
    }
    assert flatten(nested) == {
        "model.name": "tiny",
        "model.config_overrides": "{}",
        "model.layers.0": "1",
        "model.layers.1.k": "None",
        "tags": "[]",
        "seed": "0",
        "flag": "True",
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}
    assert flatten({}) == {}
    # An OmegaConf config is flattened with its interpolations resolved.
    conf = OmegaConf.create({"paths": {"root": "/r", "out": "${paths.root}/o"}, "xs": [1, 2]})
    assert flatten(conf) == {"paths.root": "/r", "paths.out": "/r/o", "xs.0": "1", "xs.1": "2"}


def test_default_tracking_uri_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(Path("outputs")) == f"sqlite:///{tmp_path.resolve()}/outputs/mlflow.db"


def test_run_tracker_round_trip(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Artifacts must land beside the database whatever the cwd is.
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker(store, "roundtrip")
    with pytest.raises(RuntimeError):
        tracker.log_metrics({"x": 1.0})

    params = {"model.name": "tiny", "long": "x" * 7000, **{f"p{i}": i for i in range(150)}}
    run_id = tracker.start(run_name="rt", params=params, tags={"hw.cpu": "test cpu", "bad key!": "v"})
    assert tracker.run_id == run_id
    tracker.log_metrics({"tok_s": 12.5, "vram_peak_bytes": None})
    tracker.log_metrics({f"m{i}": float(i) for i in range(1200)}, step=3)
    tracker.log_series("token_latency_s", [0.5, 0.25, 0.125])
    tracker.log_dict({"a": {"b": [1, 2]}, "where": Path("/x")}, "summary.json")
    # numpy scalars (float64 subclasses float) must come out as plain YAML numbers, not Python-tagged objects.
    tracker.log_dict({"c": 1, "n": np.int64(3), "f": np.float64(0.5)}, "config.yaml")
    tracker.log_text("hello\nworld\n", "notes/readme.txt")
    attached = tmp_path / "extra.txt"
    attached.write_text("attached")
    tracker.log_artifact(attached, "files")
    tracker.set_tags({"late": "yes"})
    tracker.end("FAILED", reason="boom " * 1000)
    tracker.end("FAILED", reason="again")  # idempotent: error paths may end twice

    client = _client(store)
    run = client.get_run(run_id)
    assert run.info.run_name == "rt"
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.params["model.name"] == "tiny"
    assert run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000
    assert run.data.params["long"].startswith("x" * 5000)
    assert run.data.tags["hw.cpu"] == "test cpu"
    assert run.data.tags["bad key_"] == "v"  # MLflow rejects "!" (and the whole batch with it)
    assert run.data.tags["late"] == "yes"
    # MLflow's run context providers fill in what the fluent API would.
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.user"]
    reason = run.data.tags["failure_reason"]
    assert reason.startswith("boom boom") and len(reason) <= 2000
    assert run.data.metrics["tok_s"] == 12.5
    assert "vram_peak_bytes" not in run.data.metrics
    assert run.data.metrics["m1199"] == 1199.0
    assert client.get_metric_history(run_id, "m0")[0].step == 3
    history = sorted(client.get_metric_history(run_id, "token_latency_s"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25), (2, 0.125)]

    top_level = {a.path for a in client.list_artifacts(run_id)}
    assert top_level == {"summary.json", "config.yaml", "notes", "files"}
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/readme.txt"]
    dst = tmp_path / "downloaded"
    dst.mkdir()
    summary = Path(client.download_artifacts(run_id, "summary.json", str(dst)))
    assert json.loads(summary.read_text()) == {"a": {"b": [1, 2]}, "where": "/x"}
    config = Path(client.download_artifacts(run_id, "config.yaml", str(dst)))
    assert yaml.safe_load(config.read_text()) == {"c": 1, "n": 3, "f": 0.5}
    notes = Path(client.download_artifacts(run_id, "notes/readme.txt", str(dst)))
    assert notes.read_text() == "hello\nworld\n"
    assert Path(client.download_artifacts(run_id, "files/extra.txt", str(dst))).read_text() == "attached"

    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts" / "roundtrip").as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_parent_and_children(store: str) -> None:
    parent = RunTracker(store, "nesting")
    parent_id = parent.start(run_name="parent", params={}, tags={"layerbench.role": "parent"})
    child_ids = set()
    for name in ("a", "b"):
        child = RunTracker(store, "nesting")
        child_ids.add(child.start(run_name=name, params={"name": name}, tags={}, parent_run_id=parent_id))
        child.end()
    parent.end()

    found = _runs(_client(store), "nesting", f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {run.info.run_id for run in found} == child_ids
    assert all(run.info.status == "FINISHED" for run in found)


def test_an_existing_experiment_gets_the_kind_that_opens_the_runs_view(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    tracker = RunTracker(uri, "old")
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_a_tracker_process_logs_what_an_in_process_one_does_and_ends_an_orphaned_run(
    store: str, tmp_path: Path
) -> None:
    from harness.tracking.process import TrackerProcess

    tracker = TrackerProcess(store, "in its own process")
    try:
        run_id = tracker.start(run_name="proc", params={"model": "tiny"}, tags={"hw.cpu": "test cpu"})
        assert tracker.run_id == run_id
        tracker.log_metrics({"tpot_s": 0.25, "absent": None})
        tracker.log_series("token_latency_s", [0.5, 0.25])
        attached = tmp_path / "timeline.csv"
        attached.write_text("pass,unit\n")
        tracker.log_artifact(attached)
        attached.unlink()  # the call returned: the child has copied it
        with pytest.raises(ValueError, match="status='DONE' is not valid"):  # the child's error, raised here
            tracker.end("DONE")
        with pytest.raises(RuntimeError, match="already started"):  # one run per tracker, as in-process
            tracker.start(run_name="again", params={}, tags={})
    finally:
        tracker.close()  # the job's process going away without ending its run
    run = _client(store).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == f"its process (pid {os.getpid()} on {socket.gethostname()}) ended " \
        "without closing it: killed, or out of memory"
    assert run.data.params == {"model": "tiny"} and run.data.tags["hw.cpu"] == "test cpu"
    assert run.data.metrics == {"tpot_s": 0.25, "token_latency_s": 0.25}
    assert [a.path for a in _client(store).list_artifacts(run_id)] == ["timeline.csv"]


def test_a_store_another_program_is_creating_is_opened_again(tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    from harness.tracking.client import _opened

    calls = []

    def open_store() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("CREATE TABLE experiments", {}, Exception("table experiments already exists"))
        return "store"

    assert _opened(open_store, db_path=tmp_path / 'mlflow.db', attempts=3) == "store" and len(calls) == 3
    calls.clear()

    def half_migrated() -> str:  # the winner has not added a column the loser's migration step reads
        calls.append(1)
        if len(calls) < 2:
            raise AttributeError("dimension_attributes")
        return "store"

    assert _opened(half_migrated, db_path=tmp_path / 'mlflow.db', attempts=3) == "store" and len(calls) == 2
    calls.clear()
    with pytest.raises(OperationalError):  # a server's store: its errors are not this race
        _opened(open_store, db_path=None)
    assert len(calls) == 1


def test_a_store_that_is_no_database_is_refused_at_once_by_name(tmp_path: Path) -> None:
    from harness.tracking.record import PermanentStoreError

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"these are notes, not a database\n" * 100)
    with pytest.raises(PermanentStoreError, match=rf"{db} is not a SQLite database MLflow can open .*move it aside"):
        RunTracker(default_tracking_uri(tmp_path), "anything")
    assert db.read_bytes().startswith(b"these are notes")  # left as it was


def test_a_busy_existing_store_is_not_called_new(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.exc import OperationalError

    from harness.tracking.client import _opened

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00")
    calls = []

    def locked() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise OperationalError("SELECT ...", {}, Exception("database is locked"))
        return "store"

    assert _opened(locked, db_path=db, attempts=2) == "store"
    assert "busy with another program" in caplog.text and "being created" not in caplog.text
