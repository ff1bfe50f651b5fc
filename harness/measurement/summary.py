"""The console summary printed at the end of a job: the report's labelled figures, formatted by units, and what
a newcomer must know to read them (random weights, ratios that mean nothing at this size)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields

from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.config import ModelConfig
from harness.measurement.run_report import CI_SUFFIXES, RunReport
from harness.measurement.units import format_metric

# Below this floor a token's time is the per-unit costs (Python, dispatch, allocation) that neither the floor nor
# the plan counts: their ratios to the measured time then say nothing about the links.
OVERHEAD_FLOOR_S = 5e-3


def caveats(model: ModelConfig, report: RunReport) -> tuple[set[str], list[str]]:
    """The figures the summary leaves out for this model and run, and the notes that say why."""
    hidden: set[str] = set()
    notes = []
    if model.random_weights:
        hidden |= {"quality_ppl", "quality_ppl_reference"}
        notes.append(
            f"model={model.name} has seeded random weights (a generated checkpoint): its text is noise and its "
            "perplexity means nothing (left out). For real text: model=smollm2-135m."
        )
    elif model.weights_note:
        notes.append(f"model={model.name}: {model.weights_note}.")
    if report.floor_s is not None and report.floor_s < OVERHEAD_FLOOR_S:
        hidden.add("floor_ratio")
        notes.append(
            f"the floor is {format_metric('floor_s', report.floor_s)} a token: at this size fixed per-layer costs, "
            "which the floor does not count (the plan does), set the time, so per-token time / floor is left out "
            "(still logged). For a real geometry: model=llama3.2-1b-synthetic."
        )
    return hidden, notes


def interval_text(name: str, report: RunReport) -> str:
    """` [low, high]`, a figure's 95% interval where it has one; a ratio's verdict beside it."""
    low, high = (report.spread.get(f"{name}{suffix}") for suffix in CI_SUFFIXES)
    if low is None or high is None:
        return ""
    text = f" [{format_metric(name, low)}, {format_metric(name, high)}]"
    if name == "tpot_ratio_vs_reference":
        from harness.measurement.stats import Interval, verdict  # scipy: only where a ratio has an interval

        text += f" {verdict(Interval(low, high))}"
    return text


def print_summary(
    console: Console, choices: Mapping[str, str], report: RunReport, text: str,
    hidden: Collection[str] = (), notes: Collection[str] = (),
) -> None:
    """The labelled figures that were measured, less `hidden`; the first sequence's text; then `notes`."""
    table = Table(title="layerbench: " + " ".join(f"{k}={v}" for k, v in choices.items()))
    table.add_column("metric")
    table.add_column("value", justify="right")
    # A labelled figure shows when it was measured: absent stays absent.
    for f in fields(RunReport):
        label, value = f.metadata.get("label"), getattr(report, f.name)
        if label and value is not None and f.name not in hidden:
            table.add_row(label, format_metric(f.name, value) + interval_text(f.name, report))
    console.print(table)
    console.print(Text.assemble(("generated: ", "bold"), repr(text)))
    for note in notes:
        console.print(Text.assemble(("note: ", "bold yellow"), note))
