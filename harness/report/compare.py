"""One run's figure over another's, with its 95% interval and verdict, from the samples each run logged.

A job logs each compared figure once per measured generation (`tpot_s_by_generation`, ...) and its last
generation's inter-token gaps (`token_latency_s`); `harness.measurement.stats.ratio` turns two runs' samples into
B / A with an interval. A run logged before the per-generation series existed has only its mean: its figure then
counts as a single generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.measurement.run_report import BY_GENERATION
from harness.measurement.stats import COMPARED, Ratio, ratio
from harness.measurement.units import higher_is_better, sig3
from harness.report.rows import Row

if TYPE_CHECKING:
    from mlflow import MlflowClient

GAPS = "token_latency_s"


@dataclass(frozen=True)
class Samples:
    """A run's per-generation values of each compared figure, and its last generation's inter-token gaps."""

    per_generation: dict[str, list[float]] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)


def fetch_samples(client: MlflowClient, rows: Iterable[Row]) -> dict[str, Samples]:
    """Each row's samples by run id, read from its metric histories."""

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    out = {}
    for row in rows:
        per_generation = {}
        for name in COMPARED:
            values = history(row.run_id, f"{name}{BY_GENERATION}")
            if not values and name in row.metrics:
                values = [row.metrics[name]]
            if values:
                per_generation[name] = values
        out[row.run_id] = Samples(per_generation, history(row.run_id, GAPS))
    return out


def plain_ratio(row: Row, base: Row | None, metric: str) -> float | None:
    """`row`'s figure over `base`'s, from their logged means; None where either is absent or the base is 0."""
    value = row.metrics.get(metric)
    reference = base.metrics.get(metric) if base is not None else None
    return value / reference if value is not None and reference else None


def compare(base: Samples, other: Samples, name: str) -> Ratio | None:
    """`other`'s figure over `base`'s, with its interval and what it says of `other`."""
    a, b = base.per_generation.get(name, []), other.per_generation.get(name, [])
    if not a or not b:
        return None
    per_token = name == "tpot_s"
    return ratio(
        a, b, a_gaps=base.gaps if per_token else (), b_gaps=other.gaps if per_token else (),
        lower_is_better=not higher_is_better(name),
    )


def ratio_text(found: Ratio | None, value: float | None = None) -> str:
    """`1.52x [1.31x, 1.77x] slower`; the bare ratio `value` where no interval could be estimated."""
    if found is None:
        return "–" if value is None else f"{sig3(value)}x (no interval)"
    low, high = found.interval.low, found.interval.high
    return f"{sig3(found.value)}x [{sig3(low)}x, {sig3(high)}x] {found.verdict}"
