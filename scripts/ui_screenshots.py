"""Screenshots of the MLflow UI over one fresh sweep, for a person to look at (not a test; not in CI).

    apt-get install chromium          # Debian's package
    python scripts/ui_screenshots.py /tmp/ui-shots

Runs a 4-job sweep of the tiny model into a temporary store, starts `mlflow ui` on it (127.0.0.1,
one worker), and saves headless-Chromium screenshots of the runs table, a child run, the parent
run and the compare view. Everything it starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def screenshot(chromium: str, url: str, path: Path) -> None:
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000",
         "--virtual-time-budget=20000", f"--screenshot={path}", url],
        check=True, capture_output=True, timeout=120,
    )
    print(f"{path}: {url}")


def main(out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="ui-store-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = [sys.executable, "-m", "harness", "-m", "compression=none,4bit", "cache=disk,ram", f"paths.outputs={store}",
             "workload.max_new_tokens=6", "probe.size_mib=16"]
    subprocess.run(sweep, cwd=store, env=env, check=True, timeout=900)
    uri = f"sqlite:///{store}/mlflow.db"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/health")
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("layerbench")
        runs = client.search_runs([experiment.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("layerbench.role") == "parent")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        eid = experiment.experiment_id
        child_ids = json.dumps([r.info.run_id for r in children])
        # MLflow 3.17's UI picks GenAI or model-training pages by this parameter (or the choice it remembers).
        ml = "workflowType=machine_learning"
        pages = {
            "runs_table": f"{base}/#/experiments/{eid}?{ml}",
            "child_run": f"{base}/#/experiments/{eid}/runs/{children[0].info.run_id}?{ml}",
            "parent_run": f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}?{ml}",
            "parent_artifacts": f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}/artifacts?{ml}",
            "compare": f"{base}/#/compare-runs?runs={quote(child_ids)}&experiments={quote(json.dumps([eid]))}&{ml}",
        }
        for name, url in pages.items():
            screenshot(chromium, url, out / f"{name}.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ui-shots"))
