"""A metric's value with its unit, written one way everywhere: console summary, report tables, plots.

The unit follows from the metric's name (``_s`` seconds, ``_bytes`` bytes, ``ratio``, ``_per_s``),
the naming rule every metric keeps, so a new metric is formatted right without being listed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# A metric a run did not log: never shown as 0, which would read as a measurement.
ABSENT = "–"


def sig3(value: float) -> str:
    """Three significant digits, never in exponent form (7200 -> "7,200", 0.012345 -> "0.0123")."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = 2 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) != math.floor(math.log10(abs(value))):
        decimals -= 1  # 9.996 rounds up to 10.0: one decade more, one decimal less
    return f"{rounded:,.{decimals}f}" if decimals > 0 else f"{round(value, decimals):,.0f}"


_BYTE_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def byte_scale(value: float) -> tuple[str, float]:
    """The decimal (SI) unit that shows ``value`` bytes with 1-3 digits before the point."""
    for unit, size in _BYTE_UNITS:
        # 0.9995: 999,600 B would round to "1,000 kB"; it reads better as "1.00 MB".
        if abs(value) >= size * 0.9995:
            return unit, size
    return "B", 1.0


def metric_kind(name: str) -> str:
    """How a metric is read, from its name: seconds, bytes, ratio, rate, joules, watts, or a plain number."""
    if "_bytes" in name and not name.endswith("_per_s"):  # also read_bytes_per_pass, kv_bytes_per_token
        return "bytes"
    if "ratio" in name.split("_"):  # a word: "warmup_generations" holds the letters, not the word
        return "ratio"
    if name.endswith("_per_s"):
        return "rate"
    if name.endswith("_s"):
        return "seconds"
    if name.endswith("_j"):
        return "joules"
    if name.endswith("_w"):
        return "watts"
    return "number"


def format_metric(name: str, value: float | None) -> str:
    if value is None:
        return ABSENT
    kind = metric_kind(name)
    if not math.isfinite(value):
        return str(value)
    if kind == "seconds":
        return f"{sig3(value)} s"
    if kind == "bytes":
        unit, size = byte_scale(value)
        return f"{value:,.0f} B" if unit == "B" else f"{sig3(value / size)} {unit}"
    if kind == "ratio":
        return f"{sig3(value)}x"
    if kind in ("joules", "watts"):
        return f"{sig3(value)} {'J' if kind == 'joules' else 'W'}"
    if kind == "rate":
        if name.endswith("bytes_per_s"):
            unit, size = byte_scale(value)
            return f"{sig3(value / size)} {unit}/s"
        return f"{sig3(value)} {'tok/s' if name.endswith('tokens_per_s') else '/s'}"
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"  # counts (new_tokens, passes) read better without decimals
    return sig3(value)


def axis_scale(name: str, values: Sequence[float | None]) -> tuple[str, float]:
    """A plot axis's unit and divisor for a metric, so its bars read as the tables do."""
    kind = metric_kind(name)
    present = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if kind == "bytes":
        return byte_scale(max(present, default=0.0))
    if kind == "rate" and name.endswith("bytes_per_s"):
        unit, size = byte_scale(max(present, default=0.0))
        return f"{unit}/s", size
    if kind == "rate":
        return ("tok/s" if name.endswith("tokens_per_s") else "/s"), 1.0
    return {"seconds": ("s", 1.0), "ratio": ("x", 1.0), "joules": ("J", 1.0), "watts": ("W", 1.0)}.get(kind, ("", 1.0))


# Figures where more is better (rates, agreement, efficiency); every other figure is a cost.
HIGHER_IS_BETTER_ENDINGS = ("_per_s", "agreement", "efficiency")


def higher_is_better(name: str) -> bool:
    """Which way a figure improves, from its name: comparisons' verdicts and plots' titles say it."""
    return name.endswith(HIGHER_IS_BETTER_ENDINGS)
