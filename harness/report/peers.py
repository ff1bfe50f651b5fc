"""The peers table: each runner's per-token time, TTFT and peak memory as a ratio to layerbench's run
of the same model (the times with their 95% interval and verdict where the runs logged samples), beside its
agreement with transformers' greedy tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text

import strategies
from harness.measurement.stats import COMPARED
from harness.measurement.units import format_metric, sig3
from harness.report.compare import Samples, compare, plain_ratio, ratio_text
from harness.report.rows import Row

RATIO_METRICS = ("tpot_s", "ttft_s", "peak_rss_bytes", "peak_vram_nvml_bytes")
BASELINE_RUNNER = "layerbench"


def layerbench_rows(rows: Sequence[Row]) -> dict[str | None, Row]:
    """Each model's layerbench run (the newest, when a listing holds several)."""
    return {row.params.get("model"): row for row in rows if row.params.get("runner") == BASELINE_RUNNER}


def ratio_cell(row: Row, baseline: Row | None, metric: str, samples: Mapping[str, Samples]) -> str:
    """`2.31x`, or with both runs' samples of a compared figure `2.31x [1.92x, 2.78x] slower`."""
    plain = plain_ratio(row, baseline, metric)
    if plain is None or baseline is None or row is baseline or metric not in COMPARED:
        return "–" if plain is None else f"{sig3(plain)}x"
    if row.run_id in samples and baseline.run_id in samples:
        return ratio_text(compare(samples[baseline.run_id], samples[row.run_id], metric), plain)
    return f"{sig3(plain)}x"


def peers_table(rows: Sequence[Row], title: str = "", samples: Mapping[str, Samples] | None = None) -> Table:
    """One row per run, its figures beside their ratio to layerbench's run of the same model; `samples` (by run
    id, `compare.fetch_samples`) add each time ratio's 95% interval and verdict."""
    baselines = layerbench_rows(rows)
    table = Table(
        title=Text(title) if title else None,
        caption=Text(
            f"options: {' '.join(strategies.FAMILIES)} (– where the runner has no such strategy); "
            f"x {BASELINE_RUNNER}: the run's figure / the {BASELINE_RUNNER} run's on the same model (lower is better)"
        ),
        title_justify="left",
        caption_justify="left",
    )
    for column in ("model", "runner", "options"):
        table.add_column(column, overflow="fold")
    # Only what some run measured: no VRAM columns for CPU runs.
    ratio_metrics = [m for m in RATIO_METRICS if any(row.metrics.get(m) is not None for row in rows)]
    for metric in ratio_metrics:
        table.add_column(metric, justify="right")
        table.add_column(f"x {BASELINE_RUNNER}", justify="right")
    table.add_column("agreement", justify="right")
    metrics = [*ratio_metrics, "agreement_vs_transformers"]
    shown = [row for row in rows if any(row.metrics.get(m) is not None for m in metrics)]
    for row in sorted(shown, key=lambda r: (r.params.get("model") or "", r.params.get("runner") != BASELINE_RUNNER)):
        baseline = baselines.get(row.params.get("model"))
        options = " ".join(row.params.get(f, "–") for f in strategies.FAMILIES)
        cells = [row.params.get("model", "–"), row.params.get("runner", BASELINE_RUNNER), options]
        for metric in ratio_metrics:
            cells += [format_metric(metric, row.metrics.get(metric)), ratio_cell(row, baseline, metric, samples or {})]
        cells.append(format_metric("agreement_vs_transformers", row.metrics.get("agreement_vs_transformers")))
        table.add_row(*(Text(c) for c in cells), style="bold" if row is baseline else None)
    return table
