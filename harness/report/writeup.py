"""The AirLLM write-up's figures (the project's seed) next to layerbench runs of the same compression and cache."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from harness.measurement.run_report import CI_SUFFIXES
from harness.measurement.units import ABSENT, format_metric, sig3
from harness.report.rows import Row

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
    def interval(self) -> tuple[float, float] | None:
        """The 95% interval of the ratio, from the run's own interval (the seed is one published figure)."""
        if self.ratio is None or self.run is None or self.figure is None:
            return None
        low, high = (self.run.metrics.get(f"{self.metric}{suffix}") for suffix in CI_SUFFIXES)
        if not low or not high:
            return None
        return self.figure.value / high, self.figure.value / low

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
    """`~7.10x [6.20x, 8.30x] faster`: how many times layerbench's figure goes into the write-up's, with the run's
    interval and layerbench's verdict against the published figure, where the run logged an interval."""
    ratio = line.ratio
    if ratio is None or line.figure is None:
        return ABSENT
    prefix = {">": "> ", "~": "~"}.get(line.figure.bound, "")
    text = f"{prefix}{sig3(ratio)}x"
    if (interval := line.interval) is not None:
        from harness.measurement.stats import Interval, verdict  # scipy: only where there is an interval

        # layerbench over the write-up is the reciprocal: below 1 is faster.
        text += f" [{sig3(interval[0])}x, {sig3(interval[1])}x] {verdict(Interval(1 / interval[1], 1 / interval[0]))}"
    return text


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
