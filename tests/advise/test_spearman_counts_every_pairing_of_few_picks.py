"""harness.advise.verify.spearman: the rank correlation of the advisor's picks, predicted against measured, with a
two-sided p-value counted over every pairing of a few picks (n! of them), not the large-sample approximation."""

from __future__ import annotations

import pytest

from harness.advise.space import Priced
from harness.advise.verify import EXACT_UP_TO, Verified, spearman


def _picks(predicted: list[float], measured: list[float | None]) -> list[Verified]:
    return [
        Verified(rank, Priced({}, p, 1, 0.0, 0.0, "compute", 0), m)
        for rank, (p, m) in enumerate(zip(predicted, measured, strict=True), start=1)
    ]


def test_a_perfect_ranking_of_five_picks_has_the_exact_p_of_two_pairings_in_120() -> None:
    rho, p = spearman(_picks([1, 2, 3, 4, 5], [1.1, 2.2, 2.9, 4.5, 5.0]))  # type: ignore[misc]
    assert rho == pytest.approx(1.0)
    assert p == pytest.approx(2 / 120)  # the perfect order and its reverse; the t-approximation says ~1e-24


def test_one_swapped_pair_in_five_counts_the_pairings_at_least_as_far_from_zero() -> None:
    rho, p = spearman(_picks([1, 2, 3, 4, 5], [1.0, 3.0, 2.0, 4.0, 5.0]))  # type: ignore[misc]
    assert rho == pytest.approx(0.9)
    # |rho| >= 0.9: the identity and the 4 adjacent swaps, and their 5 reverses.
    assert p == pytest.approx(10 / 120)


def test_fewer_than_three_measured_picks_give_no_correlation() -> None:
    assert spearman(_picks([1, 2, 3], [1.0, None, None])) is None


def test_many_picks_use_the_large_sample_p_value() -> None:
    n = EXACT_UP_TO + 2
    rho, p = spearman(_picks(list(range(n)), [float(i) for i in range(n)]))  # type: ignore[misc]
    assert rho == pytest.approx(1.0) and p < 1e-6
