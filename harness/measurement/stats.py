"""How sure a figure is: 95% intervals of a run's figures and of one run's figure over another's, by scipy.stats.

The method and its assumptions are in docs/statistics.md. In short: the independent samples are whole
generations (tokens within one generation share its machine state, so they are correlated). With two or more
generations a figure's interval is Student's t over their values (over their logarithms for positive figures,
so that a time's interval never goes below 0); a ratio B / A is Welch's t-interval on the
difference of their logarithms, exponentiated (an interval for the ratio of geometric means). With a single
generation, per-token time falls back on a bootstrap of its inter-token gaps, which takes them as independent
and so reads narrower than the truth; a figure with one value per generation (TTFT) then has no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from harness.measurement.run_report import CI_SUFFIXES, MEDIAN_SUFFIX

CONFIDENCE = 0.95
# What a ratio B / A says of B, spelled so everywhere: an interval that covers 1 decides nothing.
FASTER, SLOWER, WITHIN_NOISE = "faster", "slower", "within_noise"
# Bootstrap resamples: enough for a stable 95% percentile on a few dozen gaps, fast on 2 cores.
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Ratio:
    """B over A with its 95% interval and what it says of B."""

    value: float
    interval: Interval
    verdict: str
    method: str  # "welch-log-t" (generations) or "bootstrap-gaps" (one generation a side)


def verdict(interval: Interval, lower_is_better: bool = True) -> str:
    """B's verdict from the interval of B / A: within_noise where it covers 1."""
    if interval.covers(1.0):
        return WITHIN_NOISE
    below = interval.high < 1.0
    return FASTER if below == lower_is_better else SLOWER


def mean_interval(values: Sequence[float]) -> Interval | None:
    """Student's t interval of the mean of independent samples; None for fewer than two. Positive samples (times,
    rates: skewed, and never below 0) get it on their logarithms, exponentiated, so that it stays positive."""
    if len(values) < 2:
        return None
    if statistics.stdev(values) == 0:
        return Interval(values[0], values[0])
    positive = min(values) > 0
    data = np.log(values) if positive else np.asarray(values, dtype=float)
    ci = stats.ttest_1samp(data, popmean=float(np.mean(data))).confidence_interval(CONFIDENCE)
    low, high = (math.exp(ci.low), math.exp(ci.high)) if positive else (float(ci.low), float(ci.high))
    return Interval(low, high)


def bootstrap_interval(samples: Sequence[float]) -> Interval | None:
    """A percentile bootstrap of the mean of `samples`, taken as independent; None for fewer than two."""
    if len(samples) < 2:
        return None
    data = np.asarray(samples, dtype=float)
    if np.ptp(data) == 0:
        return Interval(float(data[0]), float(data[0]))
    result = stats.bootstrap(
        (data,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
        rng=np.random.default_rng(0),
    )
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


def figure_interval(per_generation: Sequence[float], gaps: Sequence[float] = ()) -> Interval | None:
    """A run's figure: over its generations when it has two or more; else over the one generation's
    inter-token `gaps` (per-token time only: pass none for a figure with one value per generation)."""
    if len(per_generation) >= 2:
        return mean_interval(per_generation)
    return bootstrap_interval(gaps) if gaps else None


def ratio(
    a: Sequence[float], b: Sequence[float], *, a_gaps: Sequence[float] = (), b_gaps: Sequence[float] = (),
    lower_is_better: bool = True,
) -> Ratio | None:
    """B / A of a figure, from each side's per-generation values (`a`, `b`); with fewer than two generations on a
    side, from per-token gaps (`a_gaps`, `b_gaps`) when both are given. None when neither can be estimated."""
    if len(a) >= 2 and len(b) >= 2 and min(*a, *b) > 0:
        log_a, log_b = np.log(a), np.log(b)
        value = math.exp(float(np.mean(log_b) - np.mean(log_a)))
        if np.ptp(log_a) == 0 and np.ptp(log_b) == 0:
            interval = Interval(value, value)
        else:
            ci = stats.ttest_ind(log_b, log_a, equal_var=False).confidence_interval(CONFIDENCE)
            interval = Interval(math.exp(ci.low), math.exp(ci.high))
        return Ratio(value, interval, verdict(interval, lower_is_better), "welch-log-t")
    if len(a_gaps) >= 2 and len(b_gaps) >= 2:
        ga, gb = np.asarray(a_gaps, dtype=float), np.asarray(b_gaps, dtype=float)
        value = float(gb.mean() / ga.mean())
        result = stats.bootstrap(
            (ga, gb), lambda x, y, axis: y.mean(axis=axis) / x.mean(axis=axis), confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(0),
        )
        ci = result.confidence_interval
        interval = Interval(float(ci.low), float(ci.high))
        if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
            interval = Interval(value, value)
        return Ratio(value, interval, verdict(interval, lower_is_better), "bootstrap-gaps")
    return None


# A run's figures that comparisons read, with their intervals logged beside them.
COMPARED = ("tpot_s", "ttft_s", "decode_tokens_per_s", "energy_per_token_j")


def median_metrics(per_generation: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`<figure>_median` of the compared figures over the measured generations, where there are two or more."""
    out = {}
    for name in COMPARED:
        values = [m[name] for m in per_generation if name in m]
        if len(values) > 1:
            out[f"{name}{MEDIAN_SUFFIX}"] = statistics.median(values)
    return out


def interval_metrics(per_generation: Sequence[Mapping[str, float]], gaps: Sequence[float]) -> dict[str, float]:
    """`<figure>_ci95_low`/`_high` of the compared figures, from each measured generation's figures and, for a
    run of one generation, its inter-token `gaps` (per-token time only)."""
    out = {}
    for name in COMPARED:
        values = [m[name] for m in per_generation if name in m]
        interval = figure_interval(values, gaps if name == "tpot_s" else ())
        if interval is not None:
            out[f"{name}{CI_SUFFIXES[0]}"], out[f"{name}{CI_SUFFIXES[1]}"] = interval.low, interval.high
    return out
