"""The lease's results (scripts/gpulease.py): one row per run, as a CSV and a Markdown table, rewritten after every
run so that a lease that ends early keeps what ran, and a JSON of every run's full report beside them.

The files are named `<date>-<machine>-gpulease.{csv,md,json}` (the machine: the GPU's name, or `cpu`), ready to be
copied into docs/results/. CSV columns use the config groups' and the metrics' own names.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from harness.measurement.units import ABSENT, format_metric

# The run's options, by the config groups' names.
OPTIONS = ("cache", "page_cache", "compression", "prefetch", "residency", "kv_cache", "cuda_graph")
METRICS = ("tpot_s", "ttft_s", "floor_s", "floor_ratio", "peak_vram_nvml_bytes", "load_s", "resident_layers")
# The machine's facts, on every row.
FACTS = ("gpu", "h2d_pinned_bytes_per_s", "torch")
CSV_COLUMNS = (
    "run", "status", "reason", "device", "model", "runner", *OPTIONS, "prompt_tokens", "new_tokens", *METRICS,
    "agreement_vs_transformers", "vram_cap_gib", "estimate_s", "elapsed_s", *FACTS, "preset", "note",
)
# (header, CSV column) of the Markdown table.
TABLE = (
    ("run", "run"), ("device", "device"), ("model", "model"), ("runner", "runner"), ("cache", "cache"),
    ("compression", "compression"), ("prefetch", "prefetch"), ("residency", "residency"), ("kv_cache", "kv_cache"),
    ("cuda graph", "cuda_graph"), ("per token", "tpot_s"), ("TTFT", "ttft_s"), ("floor", "floor_s"),
    ("floor ratio", "floor_ratio"), ("peak VRAM (NVML)", "peak_vram_nvml_bytes"), ("load", "load_s"),
    ("agreement with transformers", "agreement_vs_transformers"), ("GPU", "gpu"),
    ("H2D (pinned)", "h2d_pinned_bytes_per_s"), ("torch", "torch"), ("status", "status"),
)


def machine_slug(facts: dict[str, Any]) -> str:
    """The machine in a file name: the GPU's name in lower case letters, digits and '-', or the device."""
    name = facts.get("gpu") or facts.get("device") or "unknown"
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def cell(column: str, value: Any) -> str:
    """One Markdown cell: metrics with their units, agreement as a percentage, n/a where it could not be had."""
    if column == "agreement_vs_transformers":
        return ABSENT if value in (None, "") else f"{float(value):.0%}"
    if column in METRICS or column == "h2d_pinned_bytes_per_s":
        return format_metric(column, None if value in (None, "") else float(value))
    return ABSENT if value in (None, "") else str(value).replace("|", "/")


def status_cell(row: dict[str, Any]) -> str:
    status = str(row.get("status", ""))
    return f"{status.lower()}: {row['reason']}" if row.get("reason") else status.lower()


class Results:
    """The rows so far, in the order the lease takes the runs, with the machine's facts on each."""

    def __init__(self, outdir: Path, header: dict[str, Any]) -> None:
        self.outdir = outdir
        self.header = header  # the workload and the budget: printed above the table
        self.date = time.strftime("%Y-%m-%d")
        self.facts: dict[str, Any] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.reports: dict[str, dict[str, Any]] = {}  # every run's full metrics, by label

    @property
    def stem(self) -> str:
        return f"{self.date}-{machine_slug(self.facts or {'device': self.header.get('device')})}-gpulease"

    def paths(self) -> dict[str, Path]:
        return {kind: self.outdir / f"{self.stem}.{kind}" for kind in ("csv", "md", "json")}

    def set(self, label: str, **values: Any) -> None:
        """Adds the run's row, or updates it."""
        row = self.rows.setdefault(label, dict.fromkeys(CSV_COLUMNS, ""))
        row["run"] = label
        for key, value in values.items():
            if key not in CSV_COLUMNS:
                raise KeyError(f"{key} is no column of the lease's results: one of {', '.join(CSV_COLUMNS)}")
            row[key] = "" if value is None else value

    def place_after(self, label: str, labels: list[str]) -> None:
        """Moves the rows `labels` right after `label`'s, in that order (the runs made in its place)."""
        moved = [(k, self.rows.pop(k)) for k in labels]
        rows = list(self.rows.items())
        at = [k for k, _ in rows].index(label) + 1
        self.rows = dict(rows[:at] + moved + rows[at:])

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow({**row, **{k: self.facts.get(k, "") for k in FACTS if self.facts.get(k) is not None}})
        return out.getvalue()

    def markdown(self) -> str:
        h = self.header
        machine = self.facts.get("gpu") or self.facts.get("device", h.get("device", ""))
        rate = self.facts.get("h2d_pinned_bytes_per_s")
        lines = [
            f"# layerbench beside accelerate and AirLLM: {machine}, {self.date}",
            "",
            f"Under the {h['vram_cap_gib']:g} GiB VRAM cap, {h['prompt_tokens']} prompt tokens and {h['new_tokens']} "
            f"new tokens each; host-to-device (pinned) {format_metric('h2d_pinned_bytes_per_s', rate)}; torch "
            f"{self.facts.get('torch', '?')}, transformers {self.facts.get('transformers', '?')}, accelerate "
            f"{self.facts.get('accelerate', '?')}, AirLLM {self.facts.get('airllm') or 'not installed'}. "
            f"Budget {h['budget_s']:g} s; `scripts/gpulease.py`.",
            "",
            "| " + " | ".join(name for name, _ in TABLE) + " |",
            "|" + " --- |" * len(TABLE),
        ]
        for row in self.rows.values():
            full = {**row, **{k: self.facts.get(k) for k in FACTS}}
            if row.get("page_cache") == "cold":  # the cache and how it reads, as the run's label says it
                full["cache"] = f"{row['cache']}, cold"
            cells = [status_cell(row) if col == "status" else cell(col, full.get(col)) for _, col in TABLE]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {row['run']}: {row['note']}" for row in self.rows.values() if row.get("note")]
        if notes:
            lines += ["", "Notes:", "", *notes]
        return "\n".join(lines) + "\n"

    def save(self) -> dict[str, Path]:
        """Writes the CSV, the table and the JSON (facts, header, rows, full reports); returns their paths."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        paths = self.paths()
        for kind, text in (("csv", self.csv_text()), ("md", self.markdown()), ("json", json.dumps(
                {"header": self.header, "facts": self.facts, "rows": list(self.rows.values()),
                 "reports": self.reports}, indent=1, default=str) + "\n")):
            tmp = paths[kind].with_suffix(f".{kind}.tmp")
            tmp.write_text(text)
            tmp.replace(paths[kind])  # whole files only, even when the lease ends mid-write
        return paths
