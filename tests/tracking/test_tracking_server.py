"""tracking.uri=http://host:port (an `mlflow server` on PostgreSQL) works as the SQLite default does, with
the sweep's jobs run by Ray (hydra/launcher=ray); an unreachable server fails in seconds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.tracking.client import (
    FAILURE_REASON_TAG,
    SERVER_CHECK_TIMEOUT_S,
    RunTracker,
    TrackingServerUnreachable,
)

ROOT = Path(__file__).resolve().parents[2]
NEEDS_RAY = pytest.mark.extra(module="hydra_plugins.hydra_ray_launcher", install="pip install -e '.[ray]'")
NEEDS_POSTGRES = pytest.mark.extra(program="initdb", install="apt-get install postgresql (its initdb on PATH)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (initdb + pg_ctl in a temporary folder), stopped and removed at the end.

    initdb refuses to run as root, and CI runs as root: there the server runs as `nobody`, in a folder under
    /tmp that nobody may enter (pytest's own tmp folders are the owner's alone).
    """
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="layerbench-pg-", dir="/tmp"))
    if as_user:
        shutil.chown(folder, user="nobody")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "pg.log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres"  # the driver the test extra installs
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend store, proxying artifacts, stopped at the end."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", postgres, "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_unreachable_server_fails_after_one_bounded_health_check_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    asked: list[tuple[str, float]] = []
    real_urlopen = urllib.request.urlopen

    def urlopen(url: str, timeout: float) -> object:
        asked.append((url, timeout))
        return real_urlopen(url, timeout=timeout)

    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("MLflow's own client retries for minutes: it must not be reached")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr("mlflow.MlflowClient", no_client)
    monkeypatch.setattr("mlflow.tracking.MlflowClient", no_client)
    with pytest.raises(TrackingServerUnreachable, match=r"does not answer .*Running on several machines"):
        RunTracker(uri, "layerbench")
    assert asked == [(f"{uri}/health", SERVER_CHECK_TIMEOUT_S)], "one health check, bounded by its timeout"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray cluster of one node with 2 CPUs, started apart from the sweep (`ray start --head`), as on a cluster
    whose workers never see the sweep's environment; stopped at the end. Token authentication is off on this
    loopback-only cluster."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERBENCH_")}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    # Ray shortens its socket paths from this folder; pytest's tmp paths run past the 107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="lb-ray-", dir="/tmp"))
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray), "status", f"--address={address}"], env=env, capture_output=True).returncode:
            if time.monotonic() > deadline or head.poll() is not None:
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
        yield address
    finally:
        head.terminate()  # --block: the head stops what it started
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@NEEDS_RAY
@NEEDS_POSTGRES
def test_a_ray_sweep_logs_to_a_tracking_server_as_to_sqlite(server: str, ray_cluster: str, tmp_path: Path) -> None:
    """Four jobs through hydra/launcher=ray on a running cluster, two at once, each in its own worker process;
    every child, its metrics and artifacts under one FINISHED parent on the server."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "harness", "-m", "hydra/launcher=ray",
           f"+hydra.launcher.ray.init.address={ray_cluster}", "+hydra.launcher.ray.remote.max_calls=1",
           "cache=disk,ram", "compression=none,8bit",
           # 200 tokens, about 1 s a job: a run starts once its worker has imported, and a job of 3 tokens once
           # ended before the other worker's began (76 ms apart), so the two-at-once check rested on import times.
           f"tracking.uri={server}", f"paths.outputs={tmp_path}", "workload.max_new_tokens=200", "probe.enabled=false",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # absolute: a cluster's workers start in their own folder
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The parent's id reaches the jobs through Ray's runtime_env: the cluster's workers do not inherit the
    # sweep's environment, and the file the sweep also leaves in its folder is removed as soon as it appears.
    id_file = tmp_path / "sweep" / "mlflow_parent_run_id"
    deadline = time.monotonic() + 120
    while not id_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    id_file.unlink(missing_ok=True)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.tags["layerbench.jobs"] == "4" and parent.data.tags["layerbench.jobs_failed"] == "0"
    for run in children:
        assert run.info.status == "FINISHED" and "tpot_s" in run.data.metrics
        assert {"generation.json", "timeline.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert sorted(r.info.run_name for r in children) == ["disk·8bit", "disk·none", "ram·8bit", "ram·none"]
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert at_once == 2, f"{at_once} jobs ran at once, not 2: {spans}"
    assert len(set(re.findall(r"_run_job pid=(\d+)", output))) == 4, "each job in its own worker process"
    assert not (tmp_path / "mlflow.db").exists(), "nothing went to the local SQLite default"


@NEEDS_RAY
def test_sigterm_to_a_ray_sweep_ends_the_parent_and_its_running_jobs(ray_cluster: str, tmp_path: Path) -> None:
    """Ray's driver would abort on SIGTERM and leave every run RUNNING; the jobs die with the driver, unable to
    end their own runs: the parent ends them KILLED and itself FAILED, with the reasons."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "harness", "-m", "hydra/launcher=ray",
           f"+hydra.launcher.ray.init.address={ray_cluster}", "compression=none,8bit", "kv_cache=none",
           "workload.max_new_tokens=1500", f"paths.outputs={tmp_path}", "probe.enabled=false",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def runs() -> list:
        experiment = client.get_experiment_by_name("layerbench") if (tmp_path / "mlflow.db").exists() else None
        return client.search_runs([experiment.experiment_id]) if experiment else []

    deadline = time.monotonic() + 180
    while len(runs()) < 3:  # the parent and both jobs' runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.terminate()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode not in (0, -signal.SIGABRT), output[-3000:]
    (parent,) = [r for r in runs() if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FAILED" and parent.data.tags["layerbench.jobs"] == "2"
    assert [r.info.status for r in children] == ["KILLED", "KILLED"], [
        (r.info.status, r.data.tags.get(FAILURE_REASON_TAG)) for r in children]
    # Ended by the parent, or (a race CI met twice) by the job itself, its Ray worker made to exit: KILLED either way.
    reasons = [r.data.tags[FAILURE_REASON_TAG] for r in children]
    stopped = "the sweep was stopped before this job ended"
    assert all(reason == stopped or reason.startswith("SystemExit") for reason in reasons), reasons
    assert parent.data.tags[FAILURE_REASON_TAG] == "2 of 2 jobs failed"
