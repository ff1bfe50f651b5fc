"""Metric arithmetic on an injected clock: no sleeping, no wall-clock bounds."""

from __future__ import annotations

import pytest

from harness.metrics import LayerEvent, Timeline, inter_token_latencies, percentile, token_metrics


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


def test_timeline_sums_per_pass() -> None:
    t = Timeline()
    t.add(LayerEvent(0, "embed", 0.1, 0.0, 0.2, 100))
    t.add(LayerEvent(0, "layers.00", 0.3, 0.1, 0.5, 300))
    t.add(LayerEvent(1, "embed", 0.0, 0.0, 0.2, 0))
    assert t.per_pass("read_bytes") == [400, 0]
    assert t.per_pass("compute_s") == pytest.approx([0.7, 0.2])
    assert list(t.rows()[0]) == ["pass_index", "unit", "read_s", "decode_s", "compute_s", "read_bytes"]
