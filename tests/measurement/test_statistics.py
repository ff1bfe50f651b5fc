"""Intervals and verdicts (harness.measurement.stats): an A/A comparison is within the noise, a known slowdown is
found, a run of one generation falls back on its gaps, a rate's verdict reads the other way, and the median over
generations is logged for a plan to be held against."""

from __future__ import annotations

import random
import statistics

import pytest

from harness.measurement.run_report import RunReport
from harness.measurement.stats import (
    FASTER,
    SLOWER,
    WITHIN_NOISE,
    Interval,
    figure_interval,
    interval_metrics,
    mean_interval,
    median_metrics,
    ratio,
    verdict,
)


def generations(mean: float, n: int, seed: int, cv: float = 0.05) -> list[float]:
    """Per-generation per-token times of one configuration on a noisy machine (a fake clock's readings)."""
    rng = random.Random(seed)
    return [mean * rng.lognormvariate(0, cv) for _ in range(n)]


def test_a_against_a_is_within_noise_and_a_known_slowdown_is_slower() -> None:
    # A/A: the same configuration twice. A 95% interval misses 1 in about 1 of 20 such pairs, no more.
    verdicts = [ratio(generations(0.1, 5, seed), generations(0.1, 5, seed + 1000)).verdict for seed in range(200)]
    assert 2 <= sum(v != WITHIN_NOISE for v in verdicts) <= 20, "about 5% of 200, allowing for the draw"
    slowdown = ratio(generations(0.1, 5, 1), generations(0.15, 5, 2))
    assert slowdown.verdict == SLOWER and slowdown.interval.low > 1 and slowdown.value == pytest.approx(1.5, rel=0.1)
    speedup = ratio(generations(0.15, 5, 3), generations(0.1, 5, 4))
    assert speedup.verdict == FASTER and speedup.interval.high < 1


def test_a_wide_noise_makes_a_real_difference_undecided() -> None:
    noisy = ratio(generations(0.1, 3, 5, cv=0.6), generations(0.12, 3, 6, cv=0.6))
    assert noisy.verdict == WITHIN_NOISE and noisy.interval.covers(1.0)


def test_a_rate_is_better_higher() -> None:
    more = ratio([100.0, 101.0, 99.0], [150.0, 151.0, 149.0], lower_is_better=False)
    assert more.verdict == FASTER
    assert verdict(Interval(1.2, 1.4), lower_is_better=False) == FASTER
    assert verdict(Interval(1.2, 1.4)) == SLOWER and verdict(Interval(0.9, 1.1)) == WITHIN_NOISE


def test_one_generation_falls_back_on_its_gaps() -> None:
    gaps_a = [0.10, 0.11, 0.09, 0.10, 0.105, 0.095] * 3
    gaps_b = [g * 1.3 for g in gaps_a]
    found = ratio([0.1], [0.13], a_gaps=gaps_a, b_gaps=gaps_b)
    assert found.method == "bootstrap-gaps" and found.verdict == SLOWER
    assert found.value == pytest.approx(1.3)
    assert ratio([0.1], [0.13]) is None, "no generations to compare and no gaps: no verdict is invented"
    assert figure_interval([0.1], gaps_a).covers(sum(gaps_a) / len(gaps_a))
    assert figure_interval([0.1]) is None


def test_intervals_of_positive_figures_stay_positive() -> None:
    wide = mean_interval([0.01, 0.01, 0.05])
    assert 0 < wide.low < 0.01 < 0.05 < wide.high
    assert mean_interval([0.2]) is None
    assert mean_interval([0.2, 0.2, 0.2]) == Interval(0.2, 0.2)
    signed = mean_interval([-1.0, 0.0, 1.0])
    assert signed.low < 0 < signed.high


def test_the_median_over_generations_is_logged_from_two_of_them_and_read_back() -> None:
    per_generation = [{"tpot_s": 0.10, "ttft_s": 0.5}, {"tpot_s": 0.23, "ttft_s": 0.6}, {"tpot_s": 0.11}]
    out = median_metrics(per_generation)
    assert out == {"tpot_s_median": 0.11, "ttft_s_median": 0.55}
    assert median_metrics([{"tpot_s": 0.1}]) == {}, "one generation: the figure is its own median"
    report = RunReport(tpot_s=statistics.fmean(m["tpot_s"] for m in per_generation)).add(out)
    assert report.median("tpot_s") == 0.11 and report.tpot_s == pytest.approx(0.1467, abs=1e-4)
    assert RunReport(tpot_s=0.2).median("tpot_s") == 0.2


def test_interval_metrics_name_their_bounds_and_leave_out_what_has_none() -> None:
    per_generation = [{"tpot_s": 0.10, "ttft_s": 0.5}, {"tpot_s": 0.12, "ttft_s": 0.6}]
    out = interval_metrics(per_generation, gaps=[])
    assert set(out) == {"tpot_s_ci95_low", "tpot_s_ci95_high", "ttft_s_ci95_low", "ttft_s_ci95_high"}
    assert out["tpot_s_ci95_low"] < 0.11 < out["tpot_s_ci95_high"]
    single = interval_metrics([{"tpot_s": 0.1, "ttft_s": 0.5}], gaps=[0.1, 0.12, 0.08])
    assert set(single) == {"tpot_s_ci95_low", "tpot_s_ci95_high"}, "one TTFT a generation: no interval"
