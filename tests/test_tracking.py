"""MLflow tracking: RunTracker round trips, environment tags, and the Hydra sweep callback.

Every store is a SQLite file under a pytest tmp dir, read back with a plain MlflowClient.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from harness.measurement import environment
from harness.measurement.environment import environment_tags
from harness.sweep import MlflowSweepCallback, parent_run_id_for_job
from harness.tracking.client import RunTracker, default_tracking_uri, flatten

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store per module: creating a SQLite store runs MLflow's migrations (~2 s each).
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def _runs(client: mlflow.MlflowClient, experiment: str, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string))


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


def test_environment_tags(tmp_path: Path) -> None:
    tags = environment_tags(tmp_path)
    for key in ("version.python", "version.torch", "version.transformers", "version.mlflow", "version.hydra"):
        assert key in tags, key
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["hw.cpu_count"].isdigit()
    if sys.platform == "linux":
        assert "hw.disk" in tags
    for key, value in tags.items():
        assert isinstance(value, str) and value.strip(), key
        assert value.lower() not in ("none", "null", "0"), key
    if "git.commit" in tags:
        assert tags["git.dirty"] in ("true", "false")


@pytest.mark.parametrize(("quota", "tag"), [(1.5, "1.5"), (4.0, "4"), (None, None)])
def test_a_cpu_quota_is_tagged_and_none_is_left_out(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, tag: str | None
) -> None:
    monkeypatch.setattr(environment, "cpu_quota_cores", lambda: quota)
    assert environment.environment_tags().get("hw.cpu_quota_cores") == tag


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


# A throwaway Hydra app: only harness.tracking, none of the rest of the harness.
APP = textwrap.dedent(
    """
    from pathlib import Path

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.utils import to_absolute_path
    from omegaconf import OmegaConf

    from harness.tracking.client import RunTracker, default_tracking_uri, flatten
    from harness.sweep import parent_run_id_for_job

    ConfigStore.instance().store(
        name="app",
        node={
            "x": 0,
            "fail_on": -1,
            "tracking": {"enabled": True, "uri": None, "experiment": "sweep"},
            "paths": {"outputs": "outputs"},
            "hydra": {"callbacks": {"mlflow_sweep": {"_target_": "harness.sweep.MlflowSweepCallback"}}},
        },
    )


    @hydra.main(version_base="1.3", config_path=None, config_name="app")
    def main(cfg):
        parent = parent_run_id_for_job()  # first, as harness.__main__ asks: before any store is opened
        uri = cfg.tracking.uri or default_tracking_uri(Path(to_absolute_path(cfg.paths.outputs)))
        tracker = RunTracker(uri, cfg.tracking.experiment)
        tracker.start(
            run_name=f"x={cfg.x}",
            params=flatten(OmegaConf.to_container(cfg)),
            tags={"layerbench.role": "child"},
            parent_run_id=parent,
        )
        if cfg.x == cfg.fail_on:
            tracker.end("FAILED", reason=f"x={cfg.x} is the failing value")
            raise RuntimeError("job failed on purpose")
        tracker.log_metrics({"x": float(cfg.x), "tpot_s": 0.1 * cfg.x})
        tracker.end()


    if __name__ == "__main__":
        main()
    """
)


def _start_sweep(cwd: Path, *overrides: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    app = cwd / "app.py"
    app.write_text(APP)
    env = dict(os.environ)
    # The app must find this checkout's harness even where the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, str(app), "-m", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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
    assert note.startswith("**Fastest: x=1**") and "slowest: x=2, 2.00x that time" in note
    assert parent.data.params["fail_on"] == "-1" and "x" not in parent.data.params
    assert not (cwd / "mlruns").exists()


def test_an_existing_experiment_gets_the_kind_that_opens_the_runs_view(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    tracker = RunTracker(uri, "old")
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_the_kernels_hub_hint_is_dropped_and_other_warnings_are_not(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import strategies.compression  # noqa: F401  (installs the filter)

    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=bnb_log.name):
        bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "offline")
        bnb_log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


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


def test_ray_jobs_get_the_parent_through_runtime_env_and_sigterm_stays_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import types

    from omegaconf import OmegaConf

    from harness.sweep import RAY_LAUNCHER, _start_ray

    calls: list[dict] = []

    def init(**kwargs: object) -> None:
        calls.append(kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as Ray's driver replaces it

    fake_ray = types.SimpleNamespace(is_initialized=lambda: False, shutdown=lambda: None, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)

    def ours(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        config = OmegaConf.create({"hydra": {"launcher": {
            "_target_": RAY_LAUNCHER,
            "ray": {"init": {"address": "ray://head:10001", "num_cpus": 2,
                             "runtime_env": {"env_vars": {"HF_HOME": "/data", "X": "mine"}}}},
        }}})
        OmegaConf.set_readonly(config, True)  # as Hydra hands it over
        _start_ray(config, {"LAYERBENCH_PARENT_RUN_ID": "abc", "X": "ours"})
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
    (kwargs,) = calls
    assert kwargs["runtime_env"] == {"env_vars": {"LAYERBENCH_PARENT_RUN_ID": "abc", "HF_HOME": "/data", "X": "mine"}}
    # The plugin's own object-store size is not passed: ray.init refuses any when it joins a running cluster.
    assert {k: v for k, v in kwargs.items() if k != "runtime_env"} == {"address": "ray://head:10001", "num_cpus": 2}

    basic_launcher = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    _start_ray(OmegaConf.create({"hydra": {"launcher": {"_target_": basic_launcher}}}), {"X": "y"})
    assert len(calls) == 1, "Ray is started only for hydra/launcher=ray"


def test_a_missing_ray_launcher_is_named_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from harness.__main__ import missing_launcher

    assert missing_launcher(["-m", "cache=disk,ram"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'layerbench[ray]'" in missing_launcher(["-m", "hydra/launcher=ray", "cache=disk,ram"])
    assert missing_launcher(["-m", "+hydra/launcher=ray"]) is not None


def test_a_tracker_process_logs_what_an_in_process_one_does_and_ends_an_orphaned_run(
    store: str, tmp_path: Path
) -> None:
    from harness.tracking.process import ORPHANED, TrackerProcess

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
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == ORPHANED
    assert run.data.params == {"model": "tiny"} and run.data.tags["hw.cpu"] == "test cpu"
    assert run.data.metrics == {"tpot_s": 0.25, "token_latency_s": 0.25}
    assert [a.path for a in _client(store).list_artifacts(run_id)] == ["timeline.csv"]


def test_a_store_another_program_is_creating_is_opened_again() -> None:
    from sqlalchemy.exc import OperationalError

    from harness.tracking.client import _opened

    calls = []

    def open_store() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("CREATE TABLE experiments", {}, Exception("table experiments already exists"))
        return "store"

    assert _opened(open_store, sqlite=True, attempts=3) == "store" and len(calls) == 3
    calls.clear()

    def half_migrated() -> str:  # the winner has not added a column the loser's migration step reads
        calls.append(1)
        if len(calls) < 2:
            raise AttributeError("dimension_attributes")
        return "store"

    assert _opened(half_migrated, sqlite=True, attempts=3) == "store" and len(calls) == 2
    calls.clear()
    with pytest.raises(OperationalError):  # a server's store: its errors are not this race
        _opened(open_store, sqlite=False)
    assert len(calls) == 1
