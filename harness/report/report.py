"""`python -m harness.report`: compare runs already logged to MLflow, one table row per run.

    python -m harness.report                                  # FINISHED runs of "layerbench" in outputs/mlflow.db
    python -m harness.report --last-sweep --baseline 1a2b3c --plot sweep.png
    python -m harness.report --filter "params.model = 'tiny'" --metrics ttft_s,tpot_s --status all
    python -m harness.report --writeup --last-sweep            # experiment airllm_writeup vs the write-up's figures

Reads through an explicit ``MlflowClient`` only (no fluent ``mlflow`` global state), and never
writes to the store.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.measurement.units import ABSENT, byte_scale, format_metric, metric_kind, sig3
from harness.tracking.tracking import (
    FAILURE_REASON_TAG,
    PARENT_RUN_ID_TAG,
    ROLE_TAG,
    default_tracking_uri,
    sqlite_db_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

# The chosen option of each config group, logged as plain params by harness.job.run.run_job.
CHOICE_KEYS = ("model", "cache", "compression", "prefetch", "kv_cache")
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
SHORT_ID = 8


class ReportError(Exception):
    """Something the user can fix (no store, no experiment, no runs, bad baseline): exit code 1."""


# --- fetching --------------------------------------------------------------------------------


def open_client(uri: str) -> MlflowClient:
    """A client on an existing store: opening a missing SQLite file would create an empty store."""
    db_file = sqlite_db_path(uri)
    if db_file is not None and not db_file.is_file():
        raise ReportError(f"no MLflow store at {db_file} (--uri {uri})")
    import mlflow  # lazily: it takes seconds, and --help should not wait for it

    return mlflow.MlflowClient(tracking_uri=uri)


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of the active experiment ``name``; ReportError naming the ones that exist otherwise."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        known = ", ".join(repr(n) for n in names) if names else "none"
        state = "was deleted" if experiment is not None else "not found"
        raise ReportError(f"MLflow experiment {name!r} {state} at {client.tracking_uri} (experiments: {known})")
    return experiment.experiment_id


def search_all(
    client: MlflowClient, experiment_id: str, filter_string: str = "", order_by: Sequence[str] | None = None
) -> list[Run]:
    """Every page of a search: one call returns at most ``max_results`` runs."""
    from mlflow.exceptions import MlflowException

    runs: list[Run] = []
    token: str | None = None
    while True:
        try:
            page = client.search_runs(
                [experiment_id], filter_string=filter_string, order_by=list(order_by or []), page_token=token
            )
        except MlflowException as e:
            raise ReportError(f"MLflow rejected the search {filter_string!r}: {e.message}") from e
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    # MLflow's filter grammar has no escape for a quote inside a string literal.
    if "'" in value:
        raise ReportError(f"a run id cannot contain a quote: {value!r}")
    return f"'{value}'"


def find_parent(client: MlflowClient, experiment_id: str, ref: str | None, *, last: bool) -> str | None:
    """The parent run id of a sweep: the newest one (``last``), one by id or id prefix, or None."""
    if not last and not ref:
        return None
    # Any status: a parent run is closed FAILED when one of its jobs failed.
    parents = search_all(
        client, experiment_id, f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time DESC"]
    )
    if last:
        if not parents:
            raise ReportError("no sweep (parent run) in this experiment; run one with `python -m harness -m ...`")
        return parents[0].info.run_id
    assert ref is not None
    matches = [p.info.run_id for p in parents if p.info.run_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ReportError(f"--parent {ref!r} matches {len(matches)} sweeps: give more of the run id")
    # Not a parent run we know (perhaps a parent started by other tooling): filter on it as given.
    logger.warning("--parent %r is no sweep parent run in this experiment; filtering on it as a full run id", ref)
    return ref


def fetch_runs(
    client: MlflowClient,
    experiment_id: str,
    *,
    filter_string: str = "",
    parent_run_id: str | None = None,
    status: str = "FINISHED",
) -> list[Run]:
    """The runs to report, oldest first (a sweep's job order); sweep parent runs are left out."""
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_RUN_ID_TAG}` = {_quote(parent_run_id)}")
    if status != "ALL":
        clauses.append(f"attributes.status = '{status}'")
    filter_string = " and ".join(clauses)
    runs = search_all(client, experiment_id, filter_string, order_by=["attributes.start_time ASC"])
    logger.debug("%d runs in experiment %s match %r", len(runs), experiment_id, filter_string)
    # Filtered here, not in the search: a `!=` on a tag also drops every run without that tag.
    return [run for run in runs if run.data.tags.get(ROLE_TAG) != "parent"]


# --- rows ------------------------------------------------------------------------------------


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
        metrics=dict(run.data.metrics),
        failure_reason=run.data.tags.get(FAILURE_REASON_TAG),
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


def config_label(params: Mapping[str, str], extra_keys: Iterable[str] = ()) -> str:
    """``tiny ram none off device workload.max_new_tokens=8``: the choices, then the differing params."""
    parts = [params.get(key, ABSENT) for key in CHOICE_KEYS]
    parts += [f"{key}={params.get(key, ABSENT)}" for key in extra_keys]
    return " ".join(parts)


def build_rows(runs: Sequence[Run]) -> list[Row]:
    rows = [row_from_run(run) for run in runs]
    extra = differing_params([row.params for row in rows])
    return [replace(row, label=config_label(row.params, extra)) for row in rows]


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


# --- formatting ------------------------------------------------------------------------------


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


# --- plot ------------------------------------------------------------------------------------


def plot_scale(metric: str, values: Sequence[float | None]) -> tuple[str, float]:
    """Axis unit and divisor for a metric's bars."""
    kind = metric_kind(metric)
    if kind == "bytes":
        present = [abs(v) for v in values if v is not None and math.isfinite(v)]
        return byte_scale(max(present, default=0.0))
    return {"seconds": ("s", 1.0), "ratio": ("x", 1.0), "rate": ("/s", 1.0)}.get(kind, ("", 1.0))


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
        unit, size = plot_scale(metric, raw)
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


# --- the AirLLM write-up ---------------------------------------------------------------------

# The seed's setup: what its figures were measured on, so nobody mistakes a tiny-model run's ratio
# for a like-for-like comparison.
WRITEUP_SETUP = "Meta-Llama-3-8B-Instruct on a 4 GB GPU"
WRITEUP_METRICS = ("split_s", "split_layer_file_bytes", "ttft_s", "tpot_s")


@dataclass(frozen=True)
class SeedFigure:
    """One figure of the write-up, in the metric's unit (s, bytes)."""

    value: float
    text: str  # as the write-up put it
    bound: str = ""  # "": as stated; ">": a lower bound; "~": approximate


@dataclass(frozen=True)
class SeedRow:
    label: str
    compression: str
    cache: str
    figures: Mapping[str, SeedFigure]


AIRLLM_WRITEUP_SEED: tuple[SeedRow, ...] = (
    SeedRow(
        "bf16, layers read from disk",
        compression="none",
        cache="disk",
        # "> 2 h" and "> 2 min": the write-up stopped waiting, so only lower bounds are known.
        figures={"split_s": SeedFigure(7200.0, "> 2 h", ">"), "tpot_s": SeedFigure(120.0, "> 2 min", ">")},
    ),
    SeedRow(
        "4-bit, layers read from disk",
        compression="4bit",
        cache="disk",
        # "118 MB": stored as 10^6 bytes; the write-up does not say whether it meant MiB.
        figures={
            "split_s": SeedFigure(600.0, "~10 min", "~"),
            "split_layer_file_bytes": SeedFigure(118e6, "118 MB per layer"),
        },
    ),
    SeedRow(
        "4-bit, layers kept in RAM",
        compression="4bit",
        cache="ram",
        figures={"ttft_s": SeedFigure(119.0, "1 min 59 s"), "tpot_s": SeedFigure(7.0, "~7 s per token", "~")},
    ),
)


@dataclass(frozen=True)
class WriteupLine:
    seed: SeedRow
    run: Row | None
    metric: str
    figure: SeedFigure | None
    value: float | None

    @property
    def ratio(self) -> float | None:
        """seed / layerbench; where the seed is a bound, so is the ratio (same ``figure.bound``)."""
        if self.figure is None or self.value is None or self.value == 0 or not math.isfinite(self.value):
            return None
        return self.figure.value / self.value


def writeup_lines(rows: Sequence[Row], seed: Sequence[SeedRow] = AIRLLM_WRITEUP_SEED) -> list[WriteupLine]:
    """For each seed row, every FINISHED run with its compression and cache (or none), metric by metric."""
    lines = []
    for seed_row in seed:
        matched: list[Row | None] = [
            row
            for row in rows
            if row.status == "FINISHED"  # a failed run's partial metrics are no comparison
            and row.params.get("compression") == seed_row.compression
            and row.params.get("cache") == seed_row.cache
        ]
        for run in matched or [None]:
            for metric in WRITEUP_METRICS:
                value = run.metrics.get(metric) if run is not None else None
                if metric == "split_s" and run is not None and run.metrics.get("split_files_written") == 0:
                    value = None  # the split was reused: split_s timed its checksum pass, not a split
                lines.append(WriteupLine(seed_row, run, metric, seed_row.figures.get(metric), value))
    return lines


def format_seed(metric: str, figure: SeedFigure | None) -> str:
    if figure is None:
        return ABSENT
    bound = {">": "> ", "~": "~"}.get(figure.bound, "")
    return f"{figure.text} ({bound}{format_metric(metric, figure.value)})"


def format_ratio(line: WriteupLine) -> str:
    ratio = line.ratio
    if ratio is None or line.figure is None:
        return ABSENT
    prefix = {">": "> ", "~": "~"}.get(line.figure.bound, "")
    return f"{prefix}{sig3(ratio)}x"


def writeup_table(lines: Sequence[WriteupLine]) -> Table:
    models = sorted({line.run.params.get("model", "?") for line in lines if line.run is not None})
    title = f"AirLLM write-up ({WRITEUP_SETUP}) vs layerbench (model: {', '.join(models) or 'no matching run'})"
    table = Table(title=Text(title), title_justify="left")
    table.add_column("write-up row")
    table.add_column("run", no_wrap=True)
    table.add_column("metric")
    table.add_column("write-up", justify="right")
    table.add_column("layerbench", justify="right")
    table.add_column("write-up / layerbench", justify="right")
    for index, line in enumerate(lines):
        last_of_group = index + 1 == len(lines) or (lines[index + 1].seed, lines[index + 1].run) != (
            line.seed,
            line.run,
        )
        run_text = f"{line.run.short_id} {line.run.params.get('model', '?')}" if line.run is not None else ABSENT
        table.add_row(
            Text(f"{line.seed.label} (compression={line.seed.compression} cache={line.seed.cache})"),
            Text(run_text),
            Text(line.metric),
            Text(format_seed(line.metric, line.figure)),
            Text(format_metric(line.metric, line.value)),
            Text(format_ratio(line)),
            end_section=last_of_group,
        )
    return table


# --- command line ----------------------------------------------------------------------------


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
        "--status",
        type=str.upper,
        choices=STATUSES,
        default="FINISHED",
        metavar="STATUS",
        help="run status to list: finished (default), failed, killed, running, scheduled, or all",
    )
    parser.add_argument("--width", type=int, help="console width in characters (default: the terminal's)")
    return parser


def report(args: argparse.Namespace, console: Console) -> int:
    uri = args.uri or default_tracking_uri(Path("outputs"))
    experiment = args.experiment or (WRITEUP_EXPERIMENT if args.writeup else DEFAULT_EXPERIMENT)
    client = open_client(uri)
    experiment_id = find_experiment(client, experiment)
    parent = find_parent(client, experiment_id, args.parent, last=args.last_sweep)
    runs = fetch_runs(client, experiment_id, filter_string=args.filter, parent_run_id=parent, status=args.status)
    if not runs:
        where = f" in sweep {parent}" if parent else ""
        what = "runs" if args.status == "ALL" else f"{args.status} runs"
        filt = f" matching {args.filter!r}" if args.filter else ""
        raise ReportError(f"no {what}{filt}{where} in experiment {experiment!r} at {uri}")
    if args.baseline and not any(run.info.run_id.startswith(args.baseline) for run in runs):
        runs = [_get_run(client, args.baseline), *runs]  # a run outside the listing, named by its full id
    rows = build_rows(runs)
    baseline = find_baseline(rows, args.baseline) if args.baseline else None
    metrics = select_metrics(args.metrics, rows)
    show_status = args.status != "FINISHED" or any(row.status != "FINISHED" for row in rows)
    title = f"{experiment}: {len(rows)} run{'s' if len(rows) != 1 else ''}" + (f", sweep {parent}" if parent else "")
    console.print(metrics_table(rows, metrics, baseline=baseline, show_status=show_status, title=title))
    if args.plot:
        path = plot_rows(rows, metrics, args.plot, baseline=baseline)
        console.print(Text(f"plot: {path}"))
    if args.writeup:
        console.print(writeup_table(writeup_lines(rows)))
    return 0


def _get_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"--baseline {run_id!r} matches none of the listed runs, nor a run id in the store") from e


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


if __name__ == "__main__":
    sys.exit(main())
