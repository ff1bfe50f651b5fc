"""The report's MLflow access: open an existing store, find the experiment, sweep and runs; never writes.

Reads through an explicit ``MlflowClient`` only (no fluent ``mlflow`` global state). The only module
of the report that imports mlflow (lazily, inside functions) or knows the harness's tracking tags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harness.tracking.client import (
    FAILURE_REASON_TAG,
    PARENT_RUN_ID_TAG,
    ROLE_TAG,
    default_tracking_uri,
    sqlite_db_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)


class ReportError(Exception):
    """Something the user can fix (no store, no experiment, no runs, bad baseline): exit code 1."""


def default_uri() -> str:
    """The store the harness writes to by default, ``outputs/mlflow.db`` under the working directory."""
    return default_tracking_uri(Path("outputs"))


def open_client(uri: str) -> MlflowClient:
    """A client on an existing store: opening a missing SQLite file would create an empty store."""
    db_file = sqlite_db_path(uri)
    if db_file is not None and not db_file.is_file():
        raise ReportError(f"no MLflow store at {db_file} (--uri {uri})")
    import mlflow  # lazily: it takes seconds, and --help should not wait for it

    return mlflow.MlflowClient(tracking_uri=uri)


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of the active experiment ``name``; ReportError naming the ones that exist otherwise."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        known = ", ".join(repr(n) for n in names) if names else "none"
        state = "was deleted" if experiment is not None else "not found"
        raise ReportError(f"MLflow experiment {name!r} {state} at {client.tracking_uri} (experiments: {known})")
    return experiment.experiment_id


def search_all(
    client: MlflowClient, experiment_id: str, filter_string: str = "", order_by: Sequence[str] | None = None
) -> list[Run]:
    """Every page of a search: one call returns at most ``max_results`` runs."""
    from mlflow.exceptions import MlflowException

    runs: list[Run] = []
    token: str | None = None
    while True:
        try:
            page = client.search_runs(
                [experiment_id], filter_string=filter_string, order_by=list(order_by or []), page_token=token
            )
        except MlflowException as e:
            raise ReportError(f"MLflow rejected the search {filter_string!r}: {e.message}") from e
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    # MLflow's filter grammar has no escape for a quote inside a string literal.
    if "'" in value:
        raise ReportError(f"a run id cannot contain a quote: {value!r}")
    return f"'{value}'"


def find_parent(client: MlflowClient, experiment_id: str, ref: str | None, *, last: bool) -> str | None:
    """The parent run id of a sweep: the newest one (``last``), one by id or id prefix, or None."""
    if not last and not ref:
        return None
    # Any status: a parent run is closed FAILED when one of its jobs failed.
    parents = search_all(
        client, experiment_id, f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time DESC"]
    )
    if last:
        if not parents:
            raise ReportError("no sweep (parent run) in this experiment; run one with `python -m harness -m ...`")
        return parents[0].info.run_id
    assert ref is not None
    matches = [p.info.run_id for p in parents if p.info.run_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ReportError(f"--parent {ref!r} matches {len(matches)} sweeps: give more of the run id")
    # Not a parent run we know (perhaps a parent started by other tooling): filter on it as given.
    logger.warning("--parent %r is no sweep parent run in this experiment; filtering on it as a full run id", ref)
    return ref


def fetch_runs(
    client: MlflowClient,
    experiment_id: str,
    *,
    filter_string: str = "",
    parent_run_id: str | None = None,
    status: str = "FINISHED",
) -> list[Run]:
    """The runs to report, oldest first (a sweep's job order); sweep parent runs are left out."""
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_RUN_ID_TAG}` = {_quote(parent_run_id)}")
    if status != "ALL":
        clauses.append(f"attributes.status = '{status}'")
    filter_string = " and ".join(clauses)
    runs = search_all(client, experiment_id, filter_string, order_by=["attributes.start_time ASC"])
    logger.debug("%d runs in experiment %s match %r", len(runs), experiment_id, filter_string)
    # Filtered here, not in the search: a `!=` on a tag also drops every run without that tag.
    return [run for run in runs if run.data.tags.get(ROLE_TAG) != "parent"]


def get_baseline_run(client: MlflowClient, run_id: str) -> Run:
    """The run ``--baseline`` names by its full id, when it is not among the listed runs."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"--baseline {run_id!r} matches none of the listed runs, nor a run id in the store") from e


def failure_reason(run: Run) -> str | None:
    """Why the harness closed ``run`` FAILED, as it tagged it; None for a run without the tag."""
    return run.data.tags.get(FAILURE_REASON_TAG)
