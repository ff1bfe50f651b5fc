"""`python -m harness.report --import <job folder>`: log a job's record to a store, after the store failed it."""

from __future__ import annotations

from pathlib import Path

from harness.report.fetch import ReportError
from harness.tracking.client import FAILURE_REASON_TAG, RunTracker
from harness.tracking.record import RunRecord, TrackingFailed, replay

IMPORTED_TAG = "layerbench.imported_from"


def import_record(folder: Path, uri: str | None, experiment: str | None) -> tuple[str, str]:
    """Log the record in `folder` to `uri` (default: the store its job used) and return (run id, uri).

    Where the store still holds the job's run (left RUNNING, or closed KILLED once its process was gone), the
    record completes that run and gives it the job's own status; elsewhere it becomes a new run."""
    try:
        record = RunRecord.load(folder)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    data = record.data
    if data["logged"]:
        raise ReportError(f"{record.folder} was logged already, as run {data['run_id']} in {data['uri']}")
    if data["status"] == "RUNNING":
        raise ReportError(
            f"{record.folder} is the record of a job that never ended (it was killed, or is still running): "
            "there is no finished measurement to log"
        )
    uri = uri or data["uri"]
    if not uri:
        raise ReportError(f"{record.folder} names no store (its job ran with tracking.enabled=false): give --uri")
    tracker = RunTracker(uri, experiment or data["experiment"] or "layerbench")
    started = bool(data["run_id"]) and tracker.attach(data["run_id"])
    if started:
        # Closed KILLED while its record waited: the reason no longer holds once the record is in.
        if FAILURE_REASON_TAG in tracker.client.get_run(data["run_id"]).data.tags:
            tracker.client.delete_tag(data["run_id"], FAILURE_REASON_TAG)
    data["tags"][IMPORTED_TAG] = str(record.folder)
    try:
        replay(record, tracker, retry_s=0.0, started=started)
    except TrackingFailed as exc:
        raise ReportError(str(exc)) from None
    return str(tracker.run_id), uri
