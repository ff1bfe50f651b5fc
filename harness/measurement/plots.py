"""PNG artifacts: one pass's timeline (stages per layer, overlap visible) and per-token latency.

matplotlib is imported when a plot is drawn, not with the job (its import takes about a second), and drawn on
an Agg canvas of its own: no pyplot global state, no display needed on CI or a GPU box.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.measurement.timeline import STAGES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = {"read": "#4c72b0", "h2d": "#dd8452", "decode": "#55a868", "compute": "#c44e52", "release": "#8172b3"}


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _draw_pass(ax: Any, units: Sequence[dict], title: str) -> None:
    """One horizontal lane per unit; each stage a bar from its start to its end, in ms since the pass began."""
    origin = min(r[f"{s}_start_s"] for r in units for s in STAGES if r[f"{s}_s"] > 0)
    for lane, row in enumerate(units):
        for stage in STAGES:
            if row[f"{stage}_s"] > 0:
                start_ms = (row[f"{stage}_start_s"] - origin) * 1e3
                ax.broken_barh([(start_ms, row[f"{stage}_s"] * 1e3)], (lane - 0.4, 0.8), color=COLORS[stage])
    ax.set_yticks(range(len(units)), [r["unit"] for r in units], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def _legend(ax: Any) -> None:
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=COLORS[s]) for s in STAGES]
    ax.legend(handles, list(STAGES), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def plot_pass(rows: Sequence[dict], pass_index: int, path: Path, title: str) -> None:
    """One pass of one run."""
    units = [r for r in rows if r["pass_index"] == pass_index]
    fig = _figure(10, max(3, 0.25 * len(units) + 1))
    ax = fig.subplots()
    _draw_pass(ax, units, title)
    ax.set_xlabel("ms since the pass started")
    _legend(ax)
    fig.savefig(path, dpi=110)


def plot_passes(passes: Sequence[tuple[str, Sequence[dict]]], path: Path) -> None:
    """Several runs' passes (title, that pass's rows) stacked on one shared time axis: compared by eye."""
    lanes = max(len(units) for _, units in passes)
    fig = _figure(10, len(passes) * max(2.0, 0.18 * lanes + 0.8))
    axes = fig.subplots(len(passes), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, units) in zip(axes, passes, strict=True):
        _draw_pass(ax, units, title)
    axes[-1].set_xlabel("ms since the pass started (one scale for every run)")
    _legend(axes[0])
    fig.savefig(path, dpi=110)


def plot_token_latency(latencies_s: Sequence[float], path: Path, title: str) -> None:
    fig = _figure(7, 3.5)
    ax = fig.subplots()
    ax.plot(range(2, len(latencies_s) + 2), list(latencies_s), marker="o", markersize=3)
    ax.set_xlabel("new token")
    ax.set_ylabel("latency since previous token (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    fig.savefig(path, dpi=110)
