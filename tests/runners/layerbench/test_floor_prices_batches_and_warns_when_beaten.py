"""runner=layerbench's floor: a batch's compute is priced per sequence, and a run under its floor by more than
FLOOR_TOLERANCE is tagged `warning.floor` (both numbers), logged, and leaves the probe caches marked stale."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fake_probes import cpu_rates
from fake_runner import CPU, fake_runner, fake_setup

from harness.config_planning import ProbeConfig
from harness.measurement.run_report import RunReport
from harness.measurement.units import format_metric
from harness.probe import store
from harness.probe.floor import LINKS
from harness.runners.layerbench import floor as layerbench_floor
from harness.runners.layerbench import runner as layerbench_runner
from harness.runners.layerbench.floor import FLOOR_TOLERANCE, beaten_floor, floor_metrics
from strategies.cache.configs import CacheConfig


class _Spy:
    def __init__(self, value: float) -> None:
        self.value = value
        self.calls: list[dict[str, Any]] = []

    def __call__(self, config: object, device: object, dtype: object, cache_dir: object, *args: Any,
                 **kwargs: Any) -> float:
        self.calls.append({"args": args, **kwargs})
        return self.value


# ---------------------------------------------------------------- a batch priced per sequence


@pytest.mark.parametrize(("recomputes", "seq_len"), [(False, 1), (True, 12 + 4 // 2)])
def test_floor_metrics_prices_the_batch_as_its_sequences(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recomputes: bool, seq_len: int
) -> None:
    layer, head = _Spy(0.01), _Spy(0.002)
    monkeypatch.setattr(layerbench_floor, "load_or_measure", lambda *args, **kwargs: cpu_rates())
    monkeypatch.setattr(layerbench_floor, "load_or_measure_layer_compute_s", layer)
    monkeypatch.setattr(layerbench_floor, "load_or_measure_head_compute_s", head)
    report = RunReport(tpot_s=1.0, prompt_tokens=12, new_tokens=4, read_bytes_per_pass=0.0, h2d_bytes_per_pass=0.0,
                       decode_bytes_per_pass=0.0)
    metrics, _ = floor_metrics(fake_setup(recomputes), ProbeConfig(), CacheConfig(), 10000, report, tmp_path)
    (layer_call,) = layer.calls
    # Each sequence's own positions, and the batch beside them: not one sequence 10000 times longer.
    assert layer_call["args"][0] == seq_len and layer_call["batch"] == 10000
    (head_call,) = head.calls
    assert head_call["batch"] == 10000  # lm_head runs on every sequence's last position
    assert metrics["floor_compute_s"] == pytest.approx(2 * 0.01 + 0.002)


# ---------------------------------------------------------------- a floor beaten


def test_a_time_under_the_floor_by_more_than_the_tolerance_is_named_with_both_numbers() -> None:
    floor_s = 0.02
    tpot_s = floor_s * (1 - FLOOR_TOLERANCE) * 0.99
    text = beaten_floor(tpot_s, floor_s)
    assert text is not None
    assert format_metric("tpot_s", tpot_s) in text and format_metric("floor_s", floor_s) in text
    assert "re-measured on the next run" in text


@pytest.mark.parametrize("tpot_s", [0.02 * (1 - FLOOR_TOLERANCE) * 1.01, 0.02, 0.05, None])
def test_a_time_within_the_tolerance_or_above_the_floor_is_no_warning(tpot_s: float | None) -> None:
    assert beaten_floor(tpot_s, 0.02) is None
    assert beaten_floor(0.001, None) is None


def _annotate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tpot_s: float, draft: object | None = None
              ) -> tuple[dict[str, str], Path]:
    """`annotate` of a run with `tpot_s` against a 0.02 s floor, with this host's probe caches in place."""
    floor = {"floor_s": 0.02, **{f"floor_{link}_s": 0.0 for link in LINKS}, "floor_compute_s": 0.02}
    monkeypatch.setattr(layerbench_runner, "floor_metrics", lambda *args: (floor, {}))
    monkeypatch.setattr(layerbench_runner, "read_metrics", lambda *args: {})
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    store.cache_path(CPU, probe_dir).write_text("{}")
    runner = fake_runner(fake_setup(draft=draft), tmp_path)
    assert runner.probe_dir == probe_dir
    return runner.annotate(RunReport(tpot_s=tpot_s), SimpleNamespace()), store.cache_path(CPU, probe_dir)


def test_a_run_under_its_floor_is_tagged_logged_and_its_probe_cache_marked_stale(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tpot_s = 0.02 * (1 - FLOOR_TOLERANCE) * 0.9
    with caplog.at_level(logging.WARNING, logger=layerbench_runner.__name__):
        tags, rates_file = _annotate(monkeypatch, tmp_path, tpot_s)
    warning = tags["warning.floor"]
    assert format_metric("tpot_s", tpot_s) in warning and format_metric("floor_s", 0.02) in warning
    assert warning in caplog.text
    mark = rates_file.with_name(rates_file.name + store.STALE_SUFFIX)
    assert mark.read_text().strip() == warning


def test_a_run_just_above_the_tolerance_gets_no_floor_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tags, rates_file = _annotate(monkeypatch, tmp_path, 0.02 * (1 - FLOOR_TOLERANCE) * 1.01)
    assert "warning.floor" not in tags
    assert not rates_file.with_name(rates_file.name + store.STALE_SUFFIX).exists()


def test_a_speculative_run_under_the_floor_of_a_pass_gets_no_floor_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Several tokens a verifying pass: per token, a speculative run may well be under a pass's floor."""
    draft = SimpleNamespace(bytes=0, name="draft", decoded_once=True)
    tags, rates_file = _annotate(monkeypatch, tmp_path, 0.005, draft=draft)
    assert "warning.floor" not in tags
    assert not rates_file.with_name(rates_file.name + store.STALE_SUFFIX).exists()
