"""The report's table: one row per run, each metric with its unit, and its % difference to a baseline (with the
difference's 95% interval and verdict for the figures comparisons read)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text

from harness.measurement.stats import Ratio
from harness.measurement.units import format_metric
from harness.report.rows import CHOICE_KEYS, Row


def percent_diff(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline in percent; None where either is absent or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline)):
        return None
    return (value - baseline) / abs(baseline) * 100.0


def format_percent(percent: float | None, found: Ratio | None = None) -> str:
    """`(+12.0%)`; with a ratio's interval, `(+11.8% [+5.1%, +19.3%] slower)`."""
    if percent is None:
        return ""
    if found is None:
        return f"({percent:+.1f}%)"
    # With an interval, the difference is its own estimate (geometric means over generations), so the two agree.
    value, low, high = ((x - 1) * 100 for x in (found.value, found.interval.low, found.interval.high))
    return f"({value:+.1f}% [{low:+.1f}%, {high:+.1f}%] {found.verdict})"


def status_text(row: Row) -> str:
    if row.status == "FINISHED" or not row.failure_reason:
        return row.status
    return f"{row.status}: {row.failure_reason}"


def metrics_table(
    rows: Sequence[Row],
    metrics: Sequence[str],
    *,
    baseline: Row | None = None,
    comparisons: Mapping[tuple[str, str], Ratio | None] | None = None,
    show_status: bool = False,
    title: str = "",
) -> Table:
    """One row per run: its id, its configuration, then each metric with units (and % vs the baseline);
    `comparisons`: (run id, metric) -> that run's figure over the baseline's, with its interval."""
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
                found = (comparisons or {}).get((row.run_id, metric))
                percent = format_percent(percent_diff(value, baseline.metrics.get(metric)), found)
                cell = f"{cell} {percent}" if percent else cell
            cells.append(Text(cell))
        table.add_row(*cells, style="bold" if is_baseline else None)
    return table
