"""`python -m harness.report`: compare runs already logged to MLflow, one table row per run.

    python -m harness.report                                  # FINISHED runs of "layerbench" in outputs/mlflow.db
    python -m harness.report --last-sweep --baseline 1a2b3c --plot sweep.png
    python -m harness.report --filter "params.model = 'tiny'" --metrics ttft_s,tpot_s --status all
    python -m harness.report --writeup --last-sweep            # experiment airllm_writeup vs the write-up's figures
    python -m harness.report --experiment peers --last-sweep --peers   # each runner as a ratio to layerbench
    python -m harness.report --import outputs/runs/2026-12-06/10-00-00   # a job's record, once its store works

Writes to the store only to log a record (--import) and to close runs left RUNNING by a process that is gone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.text import Text

from harness.measurement.stats import COMPARED
from harness.report.compare import compare, fetch_samples
from harness.report.fetch import (
    ReportError,
    default_uri,
    fetch_runs,
    find_experiment,
    find_parent,
    get_baseline_run,
    open_client,
)
from harness.report.importing import import_record
from harness.report.peers import peers_table
from harness.report.plot import plot_rows
from harness.report.rows import build_rows, find_baseline, select_metrics
from harness.report.table import metrics_table
from harness.report.writeup import writeup_lines, writeup_table
from harness.tracking.orphans import close_orphans

DEFAULT_METRICS = (
    "ttft_s",
    "tpot_s",
    "token_latency_p90_s",
    "decode_tokens_per_s",
    "split_s",
    "split_layer_file_bytes",
    "peak_vram_nvml_bytes",
    "floor_ratio",
)
DEFAULT_EXPERIMENT = "layerbench"
WRITEUP_EXPERIMENT = "airllm_writeup"
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED", "ALL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.report",
        description="Compare layerbench runs logged to MLflow: one row per run, metrics with units.",
    )
    parser.add_argument("--uri", help="MLflow tracking URI (default: sqlite:///<abs>/outputs/mlflow.db)")
    parser.add_argument(
        "--experiment", help=f"experiment name (default: {DEFAULT_EXPERIMENT}; with --writeup: {WRITEUP_EXPERIMENT})"
    )
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.model = 'tiny'\"")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this sweep (id or id prefix)")
    sweep.add_argument("--last-sweep", action="store_true", help="only the child runs of the newest sweep")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma list of metrics, or 'all' (default: %(default)s)"
    )
    parser.add_argument("--baseline", metavar="RUN_ID_OR_PREFIX", help="show every other row's %% difference to it")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG with one bar chart per metric")
    parser.add_argument(
        "--writeup", action="store_true", help="also compare with the AirLLM write-up's figures (by compression, cache)"
    )
    parser.add_argument(
        "--peers", action="store_true", help="also each runner's figures as a ratio to layerbench's on the same model"
    )
    parser.add_argument(
        "--status",
        type=str.upper,
        choices=STATUSES,
        default="FINISHED",
        metavar="STATUS",
        help="run status to list: finished (default), failed, killed, running, scheduled, or all",
    )
    parser.add_argument("--width", type=int, help="console width in characters (default: the terminal's)")
    parser.add_argument(
        "--import", dest="import_folder", type=Path, metavar="JOB_FOLDER",
        help="log the record a job wrote to its folder (record/run.json) when its store failed, then exit",
    )
    return parser


def report(args: argparse.Namespace, console: Console) -> int:
    if args.import_folder is not None:
        run_id, uri = import_record(args.import_folder, args.uri, args.experiment)
        console.print(Text(f"logged {args.import_folder} as run {run_id} in {uri}"))
        return 0
    uri = args.uri or default_uri()
    experiment = args.experiment or (WRITEUP_EXPERIMENT if args.writeup else DEFAULT_EXPERIMENT)
    client = open_client(uri)
    experiment_id = find_experiment(client, experiment)
    close_orphans(client, [experiment_id])  # before listing: a dead job's run shows KILLED, not RUNNING
    parent = find_parent(client, experiment_id, args.parent, last=args.last_sweep)
    runs = fetch_runs(client, experiment_id, filter_string=args.filter, parent_run_id=parent, status=args.status)
    if not runs:
        where = f" in sweep {parent}" if parent else ""
        what = "runs" if args.status == "ALL" else f"{args.status} runs"
        filt = f" matching {args.filter!r}" if args.filter else ""
        raise ReportError(f"no {what}{filt}{where} in experiment {experiment!r} at {uri}")
    if args.baseline and not any(run.info.run_id.startswith(args.baseline) for run in runs):
        runs = [get_baseline_run(client, args.baseline), *runs]  # a run outside the listing, named by its full id
    rows = build_rows(runs)
    baseline = find_baseline(rows, args.baseline) if args.baseline else None
    metrics = select_metrics(args.metrics, rows)
    comparisons = None
    samples = fetch_samples(client, rows) if baseline is not None or args.peers else {}
    if baseline is not None:
        comparisons = {
            (row.run_id, metric): compare(samples[baseline.run_id], samples[row.run_id], metric)
            for row in rows for metric in metrics if metric in COMPARED
        }
    show_status = args.status != "FINISHED" or any(row.status != "FINISHED" for row in rows)
    title = f"{experiment}: {len(rows)} run{'s' if len(rows) != 1 else ''}" + (f", sweep {parent}" if parent else "")
    console.print(metrics_table(
        rows, metrics, baseline=baseline, comparisons=comparisons, show_status=show_status, title=title
    ))
    if args.plot:
        path = plot_rows(rows, metrics, args.plot, baseline=baseline)
        console.print(Text(f"plot: {path}"))
    if args.writeup:
        console.print(writeup_table(writeup_lines(rows)))
    if args.peers:
        console.print(peers_table(rows, title=f"{experiment}: runners side by side", samples=samples))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=args.width, highlight=False)
    try:
        return report(args, console)
    except ReportError as e:
        # soft_wrap: one line per message, so it can be grepped and read whole in a log.
        Console(stderr=True, soft_wrap=True, highlight=False).print(Text(f"error: {e}", style="red"))
        return 1
