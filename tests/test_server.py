"""tracking.uri=http://host:port (an `mlflow server` on PostgreSQL) works as the SQLite default does; an
unreachable server fails in seconds."""

from __future__ import annotations

import os
import shutil
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

from harness.tracking.client import RunTracker, TrackingServerUnreachable

ROOT = Path(__file__).resolve().parents[1]


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
    if shutil.which("initdb") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb is not on PATH")
        pytest.skip("needs PostgreSQL's binaries (initdb, pg_ctl)")
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


def test_an_unreachable_server_fails_in_seconds_before_any_work() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingServerUnreachable, match=r"does not answer .*Running on several machines"):
        RunTracker(uri, "layerbench")
    assert time.monotonic() - start < 30, "MLflow's own client retries for minutes; the check must not"


def test_a_sweep_logs_to_a_tracking_server_as_to_sqlite(server: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "harness", "-m", "cache=disk,ram", f"tracking.uri={server}",
           f"paths.outputs={tmp_path}", "workload.max_new_tokens=3", "probe.enabled=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED" and "tpot_s" in run.data.metrics
        assert {"generation.json", "timeline.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlflow.db").exists(), "nothing went to the local SQLite default"
