"""The answer on a sweep's parent run: which combination was fastest, by how much and how surely, as the UI shows it.

When a multirun ends, its parent gets the comparison of its finished children, fastest first, each
with its per-token time over the fastest's, that ratio's 95% interval and its verdict (harness.report.compare):
`comparison.md` and `comparison.csv`; `comparison.png` (the report CLI's bar charts); `timelines.png` (each
child's middle pass on one shared time axis); a description (`mlflow.note.content`) that names a fastest run only
where the others are slower beyond the noise; the fastest run's headline figures as the parent's metrics; and the
sweep's shared settings as params.
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
from harness.measurement.stats import WITHIN_NOISE, Ratio
from harness.measurement.units import format_metric
from harness.report.compare import Samples, compare, fetch_samples, plain_ratio, ratio_text
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
COLUMNS = (
    "tpot_s", "ttft_s", "energy_per_token_j", "floor_ratio", "peak_rss_bytes", "peak_vram_nvml_bytes", "quality_kl_mean"
)


def ranked(rows: Sequence[Row]) -> list[Row]:
    """Fastest first; runs without a per-token time (one new token) last, in their order."""
    return sorted(rows, key=lambda r: (r.metrics.get(RANK_BY) is None, r.metrics.get(RANK_BY, 0.0)))


def vs_fastest(rows: Sequence[Row], samples: dict[str, Samples]) -> dict[str, Ratio | None]:
    """Each ranked row's per-token time over the fastest's, with its interval and verdict, by run id (the
    fastest itself has none)."""
    best = samples[rows[0].run_id]
    return {row.run_id: compare(best, samples[row.run_id], RANK_BY) for row in rows[1:]}


def comparison_markdown(rows: Sequence[Row], columns: Sequence[str], ratios: dict[str, Ratio | None]) -> str:
    best = rows[0]
    header = f"vs fastest ({RANK_BY}, 95% interval, verdict)"
    lines = ["| run | " + " | ".join(columns) + f" | {header} |", "|" + " --- |" * (len(columns) + 2)]
    for row in rows:
        cells = [format_metric(c, row.metrics.get(c)) for c in columns]
        vs = "fastest" if row is best else ratio_text(ratios.get(row.run_id), plain_ratio(row, best, RANK_BY))
        lines.append(f"| {row.run_name} | " + " | ".join(cells) + f" | {vs} |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: Sequence[Row], columns: Sequence[str], ratios: dict[str, Ratio | None]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    vs = f"{RANK_BY}_vs_fastest"
    writer.writerow(["run", "run_id", *columns, vs, f"{vs}_ci95_low", f"{vs}_ci95_high", f"{vs}_verdict"])
    for row in rows:
        found = ratios.get(row.run_id)
        plain = plain_ratio(row, rows[0], RANK_BY)
        figures = [found.value, found.interval.low, found.interval.high, found.verdict] if found else [
            "" if plain is None else plain, "", "", "fastest" if row is rows[0] else ""]
        writer.writerow([row.run_name, row.run_id, *(row.metrics.get(c, "") for c in columns), *figures])
    return out.getvalue()


def describe(rows: Sequence[Row], ratios: dict[str, Ratio | None]) -> str:
    """The answer in a sentence: the fastest run where every other is slower beyond the noise, else the runs
    that cannot be told apart from it (or that logged no samples to tell by)."""
    timed = [r for r in rows if r.metrics.get(RANK_BY) is not None]
    if not timed:
        return f"{len(rows)} runs; none decoded a second token, so none is ranked by per-token time."
    best, worst = timed[0], timed[-1]
    others = [(r, ratios.get(r.run_id)) for r in timed[1:]]
    tied = [r.run_name for r, found in others if found is not None and found.verdict == WITHIN_NOISE]
    unknown = [r.run_name for r, found in others if found is None]
    per_token = format_metric(RANK_BY, best.metrics[RANK_BY])
    if tied:
        text = (f"**No single fastest**: {best.run_name} ({per_token} per token) and {', '.join(tied)} are within "
                "the noise of each other (the 95% interval of their per-token time ratio covers 1)")
    elif unknown:
        text = (f"**Fastest by mean: {best.run_name}**, {per_token} per token (no interval for "
                f"{', '.join(unknown)}: no per-generation samples logged)")
    else:
        text = f"**Fastest: {best.run_name}**, {per_token} per token"
    if len(timed) > 1 and worst.run_name not in tied:
        vs = ratio_text(ratios.get(worst.run_id), plain_ratio(worst, best, RANK_BY))
        text += f"; slowest: {worst.run_name}, {vs} that time"
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
    ratios = vs_fastest(rows, fetch_samples(tracker.client, rows))
    columns = [c for c in COLUMNS if any(c in r.metrics for r in rows)]
    table = comparison_markdown(rows, columns, ratios)
    tracker.log_text(table, "comparison.md")
    tracker.log_text(comparison_csv(rows, columns, ratios), "comparison.csv")
    # The runs table shows the parent beside its children: the fastest child's headline figures on it.
    tracker.log_metrics({c: rows[0].metrics[c] for c in (RANK_BY, "ttft_s") if c in rows[0].metrics})
    with tempfile.TemporaryDirectory() as tmp:
        if columns:
            tracker.log_artifact(plot_rows(rows, columns, Path(tmp) / "comparison.png", best=rows[0]))
        passes = [(r.run_name, _middle_pass(tracker.client, by_id[r.run_id], Path(tmp) / r.run_id)) for r in rows]
        passes = [(name, units) for name, units in passes if units]
        if passes:
            plot_passes(passes, Path(tmp) / "timelines.png")
            tracker.log_artifact(Path(tmp) / "timelines.png")
    tracker.set_tags({"mlflow.note.content": describe(rows, ratios) + "\n\n" + table})
