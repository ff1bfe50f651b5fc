"""harness.tracking.orphans: runs whose process is gone are found, and closed KILLED with the reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_runs import _client

from harness.tracking.client import FAILURE_REASON_TAG, RunTracker, default_tracking_uri
from harness.tracking.orphans import (
    FAULT_FILE,
    OWNER_HOST,
    OWNER_PID,
    RECORD_TAG,
    close_orphans,
    orphan_reason,
    owner_gone,
    owner_tags,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_owner_is_not_gone_and_an_exited_or_foreign_one_is() -> None:
    assert not owner_gone(owner_tags())
    assert owner_gone(owner_tags(dead_pid()))
    reused = {**owner_tags(), "layerbench.pid_start": "1"}  # this pid, but started at another time
    assert owner_gone(reused)
    assert not owner_gone({**owner_tags(dead_pid()), OWNER_HOST: "another-machine"})  # not ours to judge
    assert not owner_gone({})  # a run from before owners were tagged


def test_a_crash_signal_in_the_fault_log_is_the_reason(tmp_path: Path) -> None:
    # A real bus error, as faulthandler reports it while the process dies.
    crash = (
        "import faulthandler, os, signal, sys\n"
        f"faulthandler.enable(open({str(tmp_path / FAULT_FILE)!r}, 'w'))\n"
        "os.kill(os.getpid(), signal.SIGBUS)\n"
    )
    assert subprocess.run([sys.executable, "-c", crash]).returncode == -signal.SIGBUS
    tags = {**owner_tags(dead_pid()), RECORD_TAG: str(tmp_path)}
    reason = orphan_reason(tags)
    assert "died of a bus error (SIGBUS)" in reason and "truncated or replaced" in reason
    assert str(tmp_path) in reason
    assert orphan_reason({OWNER_PID: "7", OWNER_HOST: "h"}) == (
        "its process (pid 7 on h) ended without closing it: killed, or out of memory"
    )


@pytest.mark.parametrize("with_parent", [False, True])
def test_runs_of_a_dead_owner_are_closed_and_live_ones_kept(tmp_path: Path, with_parent: bool) -> None:
    uri = default_tracking_uri(tmp_path)
    tracker = RunTracker(uri, "orphans")
    client = tracker.client

    def run(name: str, tags: dict[str, str], parent: str | None = None) -> str:
        extra = {"mlflow.parentRunId": parent} if parent else {}
        return client.create_run(tracker.experiment_id, run_name=name, tags={**tags, **extra}).info.run_id

    dead = owner_tags(dead_pid())
    parent = run("sweep", dead)
    child = run("job", dead, parent)
    alive = run("alive", owner_tags())
    elsewhere = run("on another machine", {OWNER_PID: "1", OWNER_HOST: "not-" + socket.gethostname()}, parent)
    closed = close_orphans(client, [tracker.experiment_id], parent_run_id=parent if with_parent else None)
    expected = {parent, child, elsewhere} if with_parent else {parent, child}
    assert set(closed) == expected
    for run_id in (parent, child, alive, elsewhere):
        info = _client(uri).get_run(run_id)
        assert info.info.status == ("KILLED" if run_id in expected else "RUNNING")
    assert "ended without closing it" in _client(uri).get_run(child).data.tags[FAILURE_REASON_TAG]


def test_a_new_tracker_closes_what_a_dead_job_left_running(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    first = RunTracker(uri, "orphans")
    run_id = first.start(run_name="killed job", params={}, tags=owner_tags(dead_pid()))
    RunTracker(uri, "orphans")  # the next job opens the store
    assert _client(uri).get_run(run_id).info.status == "KILLED"
    assert os.getpid() != int(_client(uri).get_run(run_id).data.tags[OWNER_PID])
