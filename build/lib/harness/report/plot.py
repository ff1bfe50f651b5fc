"""The report's plot: a PNG with one horizontal bar chart per metric, one bar per row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from harness.measurement.units import ABSENT, axis_scale
from harness.report.rows import Row


def plot_rows(rows: Sequence[Row], metrics: Sequence[str], path: Path, *, baseline: Row | None = None) -> Path:
    """A PNG: one small horizontal bar chart per metric, one bar per row (absent metrics marked "–")."""
    # Figure + Agg canvas directly: no pyplot, so no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    height = max(2.0, 0.32 * len(rows) + 1.0)
    fig = Figure(figsize=(3.6 * ncols + 3.0, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    labels = [f"{i}. {_shorten(row.label, 40)}" for i, row in enumerate(rows, start=1)]
    positions = list(range(len(rows)))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        raw = [row.metrics.get(metric) for row in rows]
        unit, size = axis_scale(metric, raw)
        values = [v / size if v is not None and math.isfinite(v) else 0.0 for v in raw]
        colors = [
            "tab:orange" if baseline is not None and row.run_id == baseline.run_id else "tab:blue" for row in rows
        ]
        ax.barh(positions, values, color=colors)
        for pos, value in zip(positions, raw, strict=True):
            if value is None:
                ax.text(0, pos, f" {ABSENT}", va="center", ha="left")
        ax.set_title(f"{metric} ({unit})" if unit else metric, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(positions, labels)
    axes[0][0].invert_yaxis()  # row 1 on top, as in the table (the y axis is shared)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
