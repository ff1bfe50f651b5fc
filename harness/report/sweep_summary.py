"""The answer on a sweep's parent run: which combination was fastest, by how much, as the UI shows it.

When a multirun ends, its parent gets the comparison of its finished children, fastest first, each
with its ratio to the fastest: `comparison.md` and `comparison.csv`; `comparison.png` (the report
CLI's bar charts); `timelines.png` (each child's middle pass on one shared time axis); a description
(`mlflow.note.content`) that states the answer; and the sweep's shared settings as params.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

from harness.measurement.plots import plot_passes
from harness.measurement.units import format_metric, sig3
from harness.report.fetch import fetch_runs
from harness.report.plot import plot_rows
from harness.report.rows import Row, build_rows

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from harness.tracking.client import RunTracker

# What decides "fastest", then what else a reader compares.
RANK_BY = "tpot_s"
TIMELINE = "timeline.csv"
COLUMNS = ("tpot_s", "ttft_s", "floor_ratio", "peak_rss_bytes", "peak_vram_nvml_bytes", "quality_kl_mean")


def ranked(rows: Sequence[Row]) -> list[Row]:
    """Fastest first; runs without a per-token time (one new token) last, in their order."""
    return sorted(rows, key=lambda r: (r.metrics.get(RANK_BY) is None, r.metrics.get(RANK_BY, 0.0)))


def _ratio(row: Row, best: Row) -> str:
    value, fastest = row.metrics.get(RANK_BY), best.metrics.get(RANK_BY)
    return "–" if value is None or not fastest else f"{sig3(value / fastest)}x"


def comparison_markdown(rows: Sequence[Row], columns: Sequence[str]) -> str:
    best = rows[0]
    lines = ["| run | " + " | ".join(columns) + " | vs fastest |", "|" + " --- |" * (len(columns) + 2)]
    for row in rows:
        cells = [format_metric(c, row.metrics.get(c)) for c in columns]
        lines.append(f"| {row.run_name} | " + " | ".join(cells) + f" | {_ratio(row, best)} |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: Sequence[Row], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "run_id", *columns, f"{RANK_BY}_vs_fastest"])
    best = rows[0].metrics.get(RANK_BY)
    for row in rows:
        value = row.metrics.get(RANK_BY)
        ratio = value / best if value is not None and best else ""
        writer.writerow([row.run_name, row.run_id, *(row.metrics.get(c, "") for c in columns), ratio])
    return out.getvalue()


def describe(rows: Sequence[Row]) -> str:
    timed = [r for r in rows if r.metrics.get(RANK_BY) is not None]
    if not timed:
        return f"{len(rows)} runs; none decoded a second token, so none is ranked by per-token time."
    best, worst = timed[0], timed[-1]
    text = f"**Fastest: {best.run_name}**, {format_metric(RANK_BY, best.metrics[RANK_BY])} per token"
    if len(timed) > 1:
        text += f"; slowest: {worst.run_name}, {_ratio(worst, best)} that time"
    return text + f" ({len(rows)} finished runs; table and plot in the artifacts)."


def _middle_pass(client: MlflowClient, run: Run, folder: Path) -> list[dict] | None:
    """The rows of the run's middle pass (a decode pass) from its timeline.csv artifact; None without one."""
    if run.info.artifact_uri.startswith("file:"):
        # Read in place: a sweep whose job failed is summarized at interpreter exit, when MLflow's
        # downloads can no longer start their worker threads.
        path = Path(url2pathname(urlparse(run.info.artifact_uri).path)) / TIMELINE
        if not path.is_file():
            return None
    elif TIMELINE in {a.path for a in client.list_artifacts(run.info.run_id)}:
        folder.mkdir(parents=True, exist_ok=True)
        path = Path(client.download_artifacts(run.info.run_id, TIMELINE, str(folder)))
    else:
        return None
    rows = [
        {k: v if k == "unit" else (int(v) if k == "pass_index" else float(v)) for k, v in r.items()}
        for r in csv.DictReader(path.read_text().splitlines())
    ]
    passes = sorted({r["pass_index"] for r in rows})
    return [r for r in rows if r["pass_index"] == passes[len(passes) // 2]]


def summarize_sweep(tracker: RunTracker, shared_params: dict[str, str]) -> None:
    """Log the comparison of the sweep's finished children on its parent run (`tracker`)."""
    runs = fetch_runs(tracker.client, tracker.experiment_id, parent_run_id=tracker.run_id)
    tracker.log_params(shared_params)
    if not runs:
        return
    by_id = {run.info.run_id: run for run in runs}
    rows = ranked(build_rows(runs))
    columns = [c for c in COLUMNS if any(c in r.metrics for r in rows)]
    table = comparison_markdown(rows, columns)
    tracker.log_text(table, "comparison.md")
    tracker.log_text(comparison_csv(rows, columns), "comparison.csv")
    with tempfile.TemporaryDirectory() as tmp:
        if columns:
            tracker.log_artifact(plot_rows(rows, columns, Path(tmp) / "comparison.png"))
        passes = [(r.run_name, _middle_pass(tracker.client, by_id[r.run_id], Path(tmp) / r.run_id)) for r in rows]
        passes = [(name, units) for name, units in passes if units]
        if passes:
            plot_passes(passes, Path(tmp) / "timelines.png")
            tracker.log_artifact(Path(tmp) / "timelines.png")
    tracker.set_tags({"mlflow.note.content": describe(rows) + "\n\n" + table})
