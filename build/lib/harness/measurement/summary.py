"""The console summary printed at the end of a job: the report's labelled figures, formatted by units."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.measurement.run_report import RunReport
from harness.measurement.units import format_metric


def print_summary(console: Console, choices: Mapping[str, str], report: RunReport, text: str) -> None:
    table = Table(title="layerbench: " + " ".join(f"{k}={v}" for k, v in choices.items()))
    table.add_column("metric")
    table.add_column("value", justify="right")
    # A labelled figure shows when it was measured: absent stays absent.
    for f in fields(RunReport):
        label, value = f.metadata.get("label"), getattr(report, f.name)
        if label and value is not None:
            table.add_row(label, format_metric(f.name, value))
    console.print(table)
    console.print(Text.assemble(("generated: ", "bold"), repr(text)))
