"""The report's table: one row per run, each metric with its unit, and its % difference to a baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from harness.measurement.units import format_metric
from harness.report.rows import CHOICE_KEYS, Row


def percent_diff(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline in percent; None where either is absent or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline)):
        return None
    return (value - baseline) / abs(baseline) * 100.0


def format_percent(percent: float | None) -> str:
    return "" if percent is None else f"({percent:+.1f}%)"


def status_text(row: Row) -> str:
    if row.status == "FINISHED" or not row.failure_reason:
        return row.status
    return f"{row.status}: {row.failure_reason}"


def metrics_table(
    rows: Sequence[Row],
    metrics: Sequence[str],
    *,
    baseline: Row | None = None,
    show_status: bool = False,
    title: str = "",
) -> Table:
    """One row per run: its id, its configuration, then each metric with units (and % vs the baseline)."""
    # Text objects, not strings: a param value such as "[1, 2]" would otherwise be read as markup.
    caption = f"configuration: {' '.join(CHOICE_KEYS)}, then the params that differ between the runs"
    table = Table(
        title=Text(title) if title else None, caption=Text(caption), title_justify="left", caption_justify="left"
    )
    table.add_column("#", justify="right")
    table.add_column("run", no_wrap=True)
    # Folded, not cut with an ellipsis: the end of a label ("...max_new_tokens=8") is what tells rows apart.
    table.add_column("configuration", min_width=20, overflow="fold")
    if show_status:
        table.add_column("status", overflow="fold")
    for metric in metrics:
        table.add_column(metric, justify="right", overflow="fold")  # a cut "0.2…" would hide the value
    for index, row in enumerate(rows, start=1):
        is_baseline = baseline is not None and row.run_id == baseline.run_id
        cells = [Text(str(index)), Text(row.short_id), Text(row.label + (" (baseline)" if is_baseline else ""))]
        if show_status:
            cells.append(Text(status_text(row), style="red" if row.status == "FAILED" else ""))
        for metric in metrics:
            value = row.metrics.get(metric)
            cell = format_metric(metric, value)
            if baseline is not None and not is_baseline:
                percent = format_percent(percent_diff(value, baseline.metrics.get(metric)))
                cell = f"{cell} {percent}" if percent else cell
            cells.append(Text(cell))
        table.add_row(*cells, style="bold" if is_baseline else None)
    return table
