"""A sweep's watchdog: a process of its own that closes the sweep's runs when the sweep's process dies first.

A single job's runs close themselves when it is killed (its tracking process sees its pipe close). A sweep's
jobs track in the sweep's own process, so a SIGKILL or an out-of-memory kill there leaves its parent run and
its running child RUNNING. The watchdog holds a pipe from that process and sleeps; when the pipe closes
without `stop()` first, it opens the store and ends the parent, and every RUNNING child of it, KILLED with the
reason. It imports MLflow only then, so it costs the sweep's measurements nothing while they run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

STOP = b"stop\n"


class SweepWatchdog:
    def __init__(self, uri: str, experiment_id: str, parent_run_id: str) -> None:
        path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
        self._child = subprocess.Popen(
            [sys.executable, "-m", "harness.tracking.watchdog", uri, experiment_id, parent_run_id],
            stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path},
        )

    def stop(self) -> None:
        """The sweep closed its runs itself: the watchdog exits without touching the store."""
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(STOP)
            self._child.stdin.close()
        except (BrokenPipeError, ValueError):  # gone already, or stopped before
            return
        self._child.wait()


def _watch(uri: str, experiment_id: str, parent_run_id: str) -> None:
    if sys.stdin.buffer.read() == STOP:
        return
    import contextlib

    from mlflow import MlflowClient

    from harness.files import exclusive_lock
    from harness.tracking.client import sqlite_db_path
    from harness.tracking.orphans import close_orphans

    db = sqlite_db_path(uri)
    if db is not None and not db.exists():
        return  # the store is gone (its folder removed): opening it would create an empty one
    # Through the lock the store is created under: another job may be creating a new store at that path.
    with exclusive_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext():
        client = MlflowClient(uri)
    close_orphans(client, [experiment_id], parent_run_id=parent_run_id,
                  parent_reason="its sweep's process ended (killed, or out of memory) before this job did")


if __name__ == "__main__":
    # Ctrl-C and SIGTERM are the sweep's to handle: it closes its runs itself, then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _watch(*sys.argv[1:4])
