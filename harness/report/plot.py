"""The report's plot: a PNG with one horizontal bar chart per metric, one bar per row, its 95% interval drawn
where the run logged one, and which way is better said in each chart's title."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from harness.measurement.run_report import CI_SUFFIXES, RunReport
from harness.measurement.units import ABSENT, axis_scale, higher_is_better
from harness.report.rows import Row

LABELS = {f.name: f.metadata.get("label") for f in fields(RunReport)}


def title(metric: str, unit: str) -> str:
    """`per-token latency (mean) (s), lower is better`: the figure's label, its unit and its better direction."""
    better = "higher" if higher_is_better(metric) else "lower"
    name = LABELS.get(metric) or metric
    return f"{name} ({unit}), {better} is better" if unit else f"{name}, {better} is better"


def plot_rows(
    rows: Sequence[Row], metrics: Sequence[str], path: Path, *, baseline: Row | None = None, best: Row | None = None
) -> Path:
    """A PNG: one small horizontal bar chart per metric, one bar per row named by its run name where those tell the
    rows apart (absent metrics marked "–"); `baseline` in orange, `best` in green."""
    # Figure + Agg canvas directly: no pyplot, so no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    height = max(2.0, 0.32 * len(rows) + 1.0)
    fig = Figure(figsize=(3.6 * ncols + 3.0, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    names = [row.run_name for row in rows]
    distinct = all(names) and len(set(names)) == len(names)
    labels = [f"{i}. {_shorten(row.run_name if distinct else row.label, 40)}" for i, row in enumerate(rows, start=1)]
    positions = list(range(len(rows)))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        raw = [row.metrics.get(metric) for row in rows]
        unit, size = axis_scale(metric, raw)
        values = [v / size if v is not None and math.isfinite(v) else 0.0 for v in raw]
        colors = [_color(row, baseline, best) for row in rows]
        ax.barh(positions, values, color=colors, xerr=_errors(rows, metric, values, size), capsize=2)
        for pos, value in zip(positions, raw, strict=True):
            if value is None:
                ax.text(0, pos, f" {ABSENT}", va="center", ha="left")
        ax.set_title(title(metric, unit), fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(positions, labels)
    axes[0][0].invert_yaxis()  # row 1 on top, as in the table (the y axis is shared)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _color(row: Row, baseline: Row | None, best: Row | None) -> str:
    if baseline is not None and row.run_id == baseline.run_id:
        return "tab:orange"
    return "tab:green" if best is not None and row.run_id == best.run_id else "tab:blue"


def _errors(rows: Sequence[Row], metric: str, values: Sequence[float], size: float) -> list[list[float]] | None:
    """matplotlib's xerr: each bar's distance down and up to its 95% interval (0 where it has none)."""
    below, above = [], []
    for row, value in zip(rows, values, strict=True):
        low, high = (row.metrics.get(f"{metric}{suffix}") for suffix in CI_SUFFIXES)
        ok = low is not None and high is not None and value
        below.append(max(value - low / size, 0.0) if ok else 0.0)
        above.append(max(high / size - value, 0.0) if ok else 0.0)
    return [below, above] if any(below) or any(above) else None


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
