"""Runs left RUNNING by a process that no longer exists, found and closed KILLED with the reason.

Every run carries its owner's pid, host and the pid's start time (so a reused pid is not mistaken for
the owner). A job's tracking process, a sweep's watchdog, each new job and each report close the runs
whose owner on this host is gone. The reason names a crash signal when the job's fault log holds one
(`FAULT_FILE` in its record folder, written by Python's faulthandler as the process dies).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

OWNER_PID = "layerbench.pid"
OWNER_HOST = "layerbench.host"
OWNER_START = "layerbench.pid_start"
RECORD_TAG = "layerbench.record"
FAULT_FILE = "fault.txt"
GONE = "its process (pid {pid} on {host}) ended without closing it: killed, or out of memory"
# faulthandler's words for the fatal signals it reports, and what each means for a job.
SIGNALS = {
    "Bus error": "a bus error (SIGBUS): a file it had mapped into memory (a layer file) was truncated or "
                 "replaced while it read it; the next run verifies the split again",
    "Segmentation fault": "a segmentation fault (SIGSEGV)",
    "Aborted": "an abort (SIGABRT)",
    "Floating-point exception": "a floating-point exception (SIGFPE)",
    "Illegal instruction": "an illegal instruction (SIGILL)",
}


def _started(pid: int) -> str | None:
    """When process `pid` started (its create time, which tells a reused pid from the owner), or None when there is
    no such process or it has exited and waits to be reaped (a zombie)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return repr(process.create_time())
    except psutil.Error:
        return None


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name this process (or `pid`) as a run's owner."""
    pid = os.getpid() if pid is None else pid
    tags = {OWNER_PID: str(pid), OWNER_HOST: socket.gethostname()}
    if (started := _started(pid)) is not None:
        tags[OWNER_START] = started
    return tags


def owner_gone(tags: dict[str, str]) -> bool:
    """True when the run's owner ran on this host and has exited (or its pid now belongs to another process)."""
    if tags.get(OWNER_HOST) != socket.gethostname() or not tags.get(OWNER_PID, "").isdigit():
        return False  # another machine's, or a run from before owners were tagged: not ours to judge
    started = _started(int(tags[OWNER_PID]))
    return started is None or (OWNER_START in tags and started != tags[OWNER_START])


def orphan_reason(tags: dict[str, str]) -> str:
    """Why the run's owner ended, as far as can be told: a crash signal from its fault log, else killed."""
    reason = GONE.format(pid=tags.get(OWNER_PID, "?"), host=tags.get(OWNER_HOST, "?"))
    if record := tags.get(RECORD_TAG):
        try:
            fault = (Path(record) / FAULT_FILE).read_text(errors="replace")
        except OSError:
            fault = ""
        for words, meaning in SIGNALS.items():
            if f"Fatal Python error: {words}" in fault:
                reason = (f"its process (pid {tags.get(OWNER_PID, '?')}) died of {meaning} (the traceback is in "
                          f"{Path(record) / FAULT_FILE}); what it measured is in {record}")
                break
    return reason


def close_run(client: Any, run_id: str, reason: str) -> None:
    """End a RUNNING run KILLED with `reason` as its failure_reason tag."""
    from harness.tracking.client import FAILURE_REASON_TAG

    client.set_tag(run_id, FAILURE_REASON_TAG, reason)
    client.set_terminated(run_id, status="KILLED")


def close_orphans(client: Any, experiment_ids: list[str], *, parent_run_id: str | None = None,
                  parent_reason: str | None = None) -> list[str]:
    """Close the RUNNING runs of these experiments whose owner is gone; with `parent_run_id`, also every RUNNING
    child of that run (a killed sweep's jobs on other machines), with `parent_reason`. Returns the closed ids."""
    closed = []
    try:
        runs = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000)
    except Exception as exc:  # a store that cannot be searched now: the next job or report tries again
        log.warning("could not look for runs left RUNNING by dead processes: %s", exc)
        return closed
    for run in runs:
        tags = run.data.tags
        if owner_gone(tags):
            reason = orphan_reason(tags)
        elif parent_run_id is not None and tags.get("mlflow.parentRunId") == parent_run_id:
            reason = parent_reason or "its sweep's process ended before this job did"
        else:
            continue
        close_run(client, run.info.run_id, reason)
        log.warning("closed run %s (%s) KILLED: %s", run.info.run_name, run.info.run_id, reason)
        closed.append(run.info.run_id)
    return closed
