"""Runs as the report's rows: a label from the config choices and the params that differ between runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harness.config import GROUPS
from harness.measurement.run_report import RunReport
from harness.measurement.units import ABSENT
from harness.report.fetch import ReportError, failure_reason

if TYPE_CHECKING:
    from mlflow.entities import Run

# The chosen option of each config group, logged as plain params by harness.job.run.run_job.
CHOICE_KEYS = GROUPS
SHORT_ID = 8


@dataclass(frozen=True)
class Row:
    """One run as the report sees it."""

    run_id: str
    run_name: str
    status: str
    start_time: int
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    failure_reason: str | None = None
    label: str = ""

    @property
    def short_id(self) -> str:
        return self.run_id[:SHORT_ID]


def row_from_run(run: Run) -> Row:
    return Row(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        status=str(run.info.status),
        start_time=int(run.info.start_time or 0),
        params=dict(run.data.params),
        # Read through the job's own report: the figures this version knows, with their spread over repeats.
        metrics=RunReport.from_metrics(run.data.metrics).metrics(),
        failure_reason=failure_reason(run),
    )


def differing_params(param_sets: Sequence[Mapping[str, str]]) -> list[str]:
    """Param keys whose values differ between runs, beyond what the config-group choices say.

    A key inside a group (``compression.quant_type``) differs whenever the group's choice does;
    the choice is already in the label, so such a key counts only when it differs between runs
    with the same choice (``model.path`` of two ``model=local`` runs).
    """
    keys = sorted({key for params in param_sets for key in params})
    differing = []
    for key in keys:
        if key in CHOICE_KEYS:
            continue
        group = key.split(".", 1)[0]
        if "." in key and group in CHOICE_KEYS:
            by_choice: dict[str | None, set[str | None]] = {}
            for params in param_sets:
                by_choice.setdefault(params.get(group), set()).add(params.get(key))
            if any(len(values) > 1 for values in by_choice.values()):
                differing.append(key)
        elif len({params.get(key) for params in param_sets}) > 1:
            differing.append(key)
    return differing


def config_label(
    params: Mapping[str, str], extra_keys: Iterable[str] = (), choice_keys: Iterable[str] = CHOICE_KEYS
) -> str:
    """``tiny ram none off device workload.max_new_tokens=8``: the choices, then the differing params."""
    parts = [params.get(key, ABSENT) for key in choice_keys]
    parts += [f"{key}={params.get(key, ABSENT)}" for key in extra_keys]
    return " ".join(parts)


def build_rows(runs: Sequence[Run]) -> list[Row]:
    rows = [row_from_run(run) for run in runs]
    extra = differing_params([row.params for row in rows])
    # Groups no listed run logged (runs from before a group existed) would only add a column of dashes.
    keys = [key for key in CHOICE_KEYS if any(key in row.params for row in rows)]
    return [replace(row, label=config_label(row.params, extra, keys)) for row in rows]


def find_baseline(rows: Sequence[Row], ref: str) -> Row:
    """The row whose run id is ``ref`` or starts with it."""
    matches = [row for row in rows if row.run_id.startswith(ref)]
    if not matches:
        raise ReportError(f"--baseline {ref!r} matches none of the {len(rows)} listed runs")
    if len(matches) > 1:
        ids = ", ".join(row.short_id for row in matches)
        raise ReportError(f"--baseline {ref!r} matches {len(matches)} runs ({ids}): give more of the run id")
    return matches[0]


def select_metrics(spec: str, rows: Sequence[Row]) -> list[str]:
    """A comma list, in order, without repeats; ``all``: every metric any row logged."""
    if spec.strip().lower() == "all":
        names = sorted({key for row in rows for key in row.metrics})
        if not names:
            raise ReportError("--metrics all: none of the listed runs logged a metric")
        return names
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ReportError("--metrics names no metric")
    return list(dict.fromkeys(names))
