"""Metric arithmetic on an injected clock: no sleeping, no wall-clock bounds."""

from __future__ import annotations

import pytest
import torch

from harness.measurement.metrics import aggregate, inter_token_latencies, percentile, token_metrics
from harness.measurement.timeline import LOAD_STAGES, STAGES, StageClock, per_pass, stage_metrics


def test_token_metrics_on_known_times() -> None:
    # Prompt tokenized at t=10; first token 2 s later, then gaps 1, 1, 1, 3 s.
    times = [12.0, 13.0, 14.0, 15.0, 18.0]
    m = token_metrics(10.0, times)
    assert m["ttft_s"] == pytest.approx(2.0)
    assert inter_token_latencies(times) == [1.0, 1.0, 1.0, 3.0]
    assert m["tpot_s"] == pytest.approx(6.0 / 4)
    assert m["decode_tokens_per_s"] == pytest.approx(4 / 6.0)
    assert m["token_latency_p50_s"] == pytest.approx(1.0)
    assert m["token_latency_p90_s"] == pytest.approx(1.0 + 0.7 * 2.0)  # between the 3rd and 4th gap
    assert m["token_latency_p99_s"] == pytest.approx(1.0 + 0.97 * 2.0)
    assert m["new_tokens"] == 5


def test_one_token_has_ttft_and_no_decode_figures() -> None:
    m = token_metrics(0.0, [0.5])
    assert m["ttft_s"] == 0.5
    assert not any(k.startswith(("tpot", "token_latency", "decode")) for k in m), "absent, not zero"


def test_percentile_matches_numpy_linear() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 25) == 2.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def rows_of(passes: list[list[dict[str, float]]]) -> list[dict]:
    """Timeline rows from per-unit stage durations laid end to end (no overlap)."""
    rows, t = [], 0.0
    for index, units in enumerate(passes):
        for unit, stages in enumerate(units):
            row: dict = {"pass_index": index, "unit": f"u{unit}"}
            for stage in STAGES:
                row[f"{stage}_start_s"], row[f"{stage}_s"] = t, stages.get(stage, 0.0)
                t += stages.get(stage, 0.0)
            for stage in LOAD_STAGES:
                row[f"{stage}_bytes"] = int(stages.get(f"{stage}_bytes", 0))
            row["compute_issue_s"] = stages.get("issue", 0.0)
            row["load_issue_s"] = stages.get("load_issue", 0.0)
            rows.append(row)
    return rows


def test_stage_shares_bandwidth_and_crosscheck() -> None:
    unit = {"read": 0.2, "h2d": 0.1, "decode": 0.1, "compute": 0.5, "release": 0.1, "read_bytes": 100, "h2d_bytes": 50,
            "issue": 0.25, "load_issue": 0.125}
    rows = rows_of([[unit, unit]] * 3)  # prefill + 2 decode passes, 1.0 s per unit
    assert per_pass(rows, "read_bytes") == [200, 200, 200]
    m = stage_metrics(rows, walls=[2.0, 2.0, 2.2], overlapped=False)
    assert m["stage_compute_share"] == pytest.approx(0.5) and m["stage_read_share"] == pytest.approx(0.2)
    assert m["stage_compute_s"] == pytest.approx(1.0)  # per decode pass
    assert m["compute_issue_s"] == pytest.approx(0.5)  # the host's part of it, per decode pass
    assert m["load_issue_s"] == pytest.approx(0.25)
    assert m["read_bandwidth_bytes_per_s"] == pytest.approx(100 / 0.2)
    assert m["crosscheck_residual"] == pytest.approx(0.2 / 2.2)  # the worst pass: 10% of its time untimed
    assert "overlap_efficiency" not in m


def test_overlap_efficiency() -> None:
    unit = {"read": 0.3, "compute": 0.5}
    rows = rows_of([[unit, unit]] * 2)  # load 0.6 s and compute 1.0 s per pass: 0.6 s could be hidden
    m = stage_metrics(rows, walls=[1.3, 1.0], overlapped=True)
    assert m["overlap_efficiency"] == pytest.approx((0.3 / 0.6 + 0.6 / 0.6) / 2)
    assert "crosscheck_residual" not in m


def test_stage_clock_on_cpu_is_one_axis() -> None:
    clock = StageClock(torch.device("cpu"))
    a, b = clock.host(), clock.device()
    assert 0 <= clock.seconds(a) <= clock.seconds(b)


def test_aggregate_mean_std_cv() -> None:
    out = aggregate([{"tpot_s": 1.0, "x": 0.0}, {"tpot_s": 3.0, "x": 0.0}])
    assert out["tpot_s"] == 2.0 and out["tpot_s_std"] == pytest.approx(2**0.5)
    assert out["tpot_s_cv"] == pytest.approx(2**0.5 / 2)
    assert "x_cv" not in out  # a zero mean has no coefficient of variation
    assert aggregate([{"tpot_s": 1.0}]) == {"tpot_s": 1.0}


def test_a_batchs_throughput_counts_every_sequences_tokens() -> None:
    from harness.measurement.metrics import token_metrics

    # Three steps of a batch of two; the second sequence ended (EOS) after the second step.
    m = token_metrics(0.0, [1.0, 2.0, 3.0], sequences=[[5, 6, 7], [8, 9]])
    assert m["tpot_s"] == 1.0 and m["decode_tokens_per_s"] == (2 + 1) / 2.0
    assert token_metrics(0.0, [1.0, 2.0, 3.0], sequences=[[5, 6, 7]])["decode_tokens_per_s"] == 1.0
