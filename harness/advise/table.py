"""The advisor's ranking as a terminal table, a CSV and a markdown table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from rich.table import Table

from harness.advise.space import DEFAULT, FREE_GROUPS, SEED, Priced, Refused

GB = 1e9
GIB = 1 << 30
COLUMNS = (
    "rank", *FREE_GROUPS, "predicted_s", "tokens_per_s", "bytes_per_pass_gb", "peak_gib", "resident_layers",
    "limiting", "note",
)


def _note(p: Priced) -> str:
    notes = [name for name, choices in (("default", DEFAULT), ("seed", SEED))
             if all(p.choices.get(g) == v for g, v in choices.items())]
    return ", ".join(notes)


def rows(ranking: Sequence[Priced], top: int) -> list[dict[str, object]]:
    """The first `top` ranks, then today's default and the seed's configuration where they rank lower."""
    shown = [i for i in range(min(top, len(ranking)))]
    shown += [i for i, p in enumerate(ranking) if i >= top and _note(p)]
    return [
        {
            "rank": i + 1,
            **{g: ranking[i].choices.get(g, "") for g in FREE_GROUPS},
            "predicted_s": ranking[i].predicted_s,
            "tokens_per_s": ranking[i].tokens_per_s,
            "bytes_per_pass_gb": ranking[i].bytes_per_pass / GB,
            "peak_gib": ranking[i].peak_bytes / GIB,
            "resident_layers": ranking[i].resident_layers,
            "limiting": ranking[i].limiting,
            "note": _note(ranking[i]),
        }
        for i in shown
    ]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# The terminal table's columns: the configuration in one (its options in FREE_GROUPS order), short headers.
_SHORT = (
    ("rank", "#"), ("predicted_s", "s / token"), ("tokens_per_s", "tokens / s"), ("bytes_per_pass_gb", "GB / pass"),
    ("peak_gib", "peak GiB"), ("resident_layers", "resident"), ("limiting", "limit"), ("note", ""),
)


def rich_table(title: str, table_rows: Sequence[dict[str, object]]) -> Table:
    table = Table(title=title, caption="configuration: " + " ".join(FREE_GROUPS))
    table.add_column("#", justify="right")
    table.add_column("configuration")
    for _, header in _SHORT[1:]:
        table.add_column(header, justify="left" if header in ("limit", "") else "right")
    for row in table_rows:
        table.add_row(
            str(row["rank"]), " ".join(str(row[g]) for g in FREE_GROUPS), *(_cell(row[c]) for c, _ in _SHORT[1:])
        )
    return table


def csv_text(table_rows: Sequence[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(table_rows)
    return out.getvalue()


def markdown(table_rows: Sequence[dict[str, object]], extra: Sequence[str] = ()) -> str:
    """`table_rows` (with any `extra` columns they hold) as a markdown table."""
    columns = [*COLUMNS, *extra]
    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in table_rows]
    return "\n".join(lines) + "\n"


def refusals(refused: Sequence[Refused]) -> list[str]:
    """One line per reason, with the configurations it refused: a cap most configurations exceed is said once."""
    by_reason: dict[str, list[str]] = {}
    for r in refused:
        by_reason.setdefault(r.reason, []).append(" ".join(f"{g}={v}" for g, v in r.choices.items()))
    return [
        f"refused {len(labels)} configuration{'s' if len(labels) > 1 else ''} ({'; '.join(labels[:3])}"
        f"{'; ...' if len(labels) > 3 else ''}): {reason}"
        for reason, labels in by_reason.items()
    ]
