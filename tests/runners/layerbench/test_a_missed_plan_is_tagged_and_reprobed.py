"""runner=layerbench's plan check: a run off its plan's prediction by more than PLAN_TOLERANCE, either way, is
tagged `warning.plan` (both numbers), logged, and leaves the stream probes that priced its options (and its
draft's) and the cold reads of its cache marked stale, so the next run measures them again; a run within the
tolerance leaves them as they are."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_runner import CPU, fake_runner, fake_setup

from harness.measurement.run_report import RunReport
from harness.measurement.units import format_metric
from harness.probe import store
from harness.probe.stream import StreamTimes
from harness.runners.layerbench import runner as layerbench_runner
from harness.runners.layerbench.cost import TokenCost, stream_options
from harness.runners.layerbench.plan import PLAN_TOLERANCE, Plan, missed_plan
from strategies.cache.configs import DiskCacheConfig
from strategies.compression.configs import Blockwise4bitConfig

PREDICTED_S = 0.02


def _stream_file(probe_dir: Path, config: object, options: dict[str, object], **form: object) -> Path:
    """A stream probe cache file for `options` (and `form`: resident, batch, ...), written as a run's plan would."""
    before = set(probe_dir.glob("*-stream-*.json"))
    store.load_or_measure_stream(config, CPU, config.dtype, probe_dir, options=options, **form)  # type: ignore[attr-defined]
    (written,) = set(probe_dir.glob("*-stream-*.json")) - before
    return written


def _read_file(probe_dir: Path, cache: object) -> Path:
    """A cold read probe cache file for `cache`, written as a cold run's plan would."""
    before = set(probe_dir.glob("*-read-*.json"))
    store.load_or_measure_cold_read_s(cache, CPU, 4096, probe_dir)  # type: ignore[arg-type]
    (written,) = set(probe_dir.glob("*-read-*.json")) - before
    return written


def _head_file(probe_dir: Path, config: object, evicted: bool) -> Path:
    """A head compute cache file of `config`, written as a plan (`evicted`) or a floor would."""
    before = set(probe_dir.glob("*-head-*.json"))
    store.load_or_measure_head_compute_s(config, CPU, config.dtype, probe_dir, evicted=evicted)  # type: ignore[attr-defined]
    (written,) = set(probe_dir.glob("*-head-*.json")) - before
    return written


def _stale(path: Path) -> bool:
    return path.with_name(path.name + store.STALE_SUFFIX).exists()


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """A runner planned at PREDICTED_S, and in its probe folder stream files of its options (streamed and resident)
    and of another codec's, cold read files of its cache and of another, and its geometry's head, evicted as the
    plan prices it and hot as the floor does."""
    monkeypatch.setattr(store, "measure_stream", lambda *args, **kwargs: StreamTimes(layer_s=0.01, pass_s=0.0))
    monkeypatch.setattr(store, "measure_cold_read_s", lambda *args, **kwargs: 0.001)
    monkeypatch.setattr(store, "measure_head_compute_s", lambda *args, **kwargs: 0.001)
    monkeypatch.setattr(layerbench_runner, "floor_metrics", lambda *args: ({}, {}))
    monkeypatch.setattr(layerbench_runner, "read_metrics", lambda *args: {})
    monkeypatch.setattr(layerbench_runner, "check_floor", lambda *args: None)
    plan = Plan([], ["layers.0", "layers.1"], 0.0, 0.0, TokenCost(0.0, PREDICTED_S, 0.0, 0.0), "compute")
    setup = fake_setup()
    runner = fake_runner(setup, tmp_path, plan)
    runner.probe_dir.mkdir(parents=True)
    options = stream_options(runner.cfg)
    return SimpleNamespace(
        runner=runner,
        own=[
            *(_stream_file(runner.probe_dir, setup.config, options, resident=r) for r in (False, True)),
            _read_file(runner.probe_dir, options["cache"]),
            _head_file(runner.probe_dir, setup.config, evicted=True),
        ],
        other=_stream_file(runner.probe_dir, setup.config, {**options, "compression": Blockwise4bitConfig()}),
        other_read=_read_file(runner.probe_dir, DiskCacheConfig(page_cache="cold")),
        floor_head=_head_file(runner.probe_dir, setup.config, evicted=False),
    )


@pytest.mark.parametrize("ratio", [1 + 1.5 * PLAN_TOLERANCE, 1 - 1.5 * PLAN_TOLERANCE], ids=["slower", "faster"])
def test_a_run_off_its_plan_is_tagged_logged_and_its_options_reprobed(
    probed: SimpleNamespace, caplog: pytest.LogCaptureFixture, ratio: float
) -> None:
    with caplog.at_level(logging.WARNING, logger=layerbench_runner.__name__):
        tags = probed.runner.annotate(RunReport(tpot_s=PREDICTED_S * ratio), SimpleNamespace())
    warning = tags["warning.plan"]
    assert format_metric("tpot_s", PREDICTED_S * ratio) in warning
    assert format_metric("plan_predicted_s", PREDICTED_S) in warning and f"{ratio:.2f}x" in warning
    assert warning in caplog.text
    assert all(_stale(path) for path in probed.own)
    assert not _stale(probed.other), "another codec's probe priced no part of this plan"
    assert not _stale(probed.other_read), "nor did another cache's cold read"
    assert not _stale(probed.floor_head), "nor the floor's head"


def test_a_speculative_run_off_its_plan_reprobes_its_drafts_options_too(probed: SimpleNamespace) -> None:
    """A speculative plan prices the draft's steps with the draft's own stream probes: a miss re-measures them."""
    draft_config = copy.deepcopy(probed.runner.setup.config)
    draft_config.num_hidden_layers = 1
    draft_options = {**stream_options(probed.runner.cfg), "compression": Blockwise4bitConfig()}
    draft_file = _stream_file(probed.runner.probe_dir, draft_config, draft_options, resident=True)
    probed.runner.setup.draft = SimpleNamespace(
        model=SimpleNamespace(config=draft_config), options=draft_options, bytes=0, name="draft", decoded_once=True,
    )
    tags = probed.runner.annotate(RunReport(tpot_s=2 * PREDICTED_S), SimpleNamespace())
    assert "warning.plan" in tags
    assert _stale(draft_file) and all(_stale(path) for path in probed.own)
    assert not _stale(probed.other), "the target's geometry with another codec priced nothing"


def test_a_plan_is_held_against_the_median_generation_not_the_mean(probed: SimpleNamespace) -> None:
    """One disturbed generation of three moves the mean past the tolerance, not the median."""
    report = RunReport(tpot_s=1.4 * PREDICTED_S).add({"tpot_s_median": 1.02 * PREDICTED_S})
    tags = probed.runner.annotate(report, SimpleNamespace())
    assert "warning.plan" not in tags and report.plan_ratio == pytest.approx(1.02)
    assert not any(_stale(path) for path in probed.own)


def test_a_run_within_the_tolerance_of_its_plan_keeps_its_probes(probed: SimpleNamespace) -> None:
    tags = probed.runner.annotate(RunReport(tpot_s=PREDICTED_S * (1 + 0.9 * PLAN_TOLERANCE)), SimpleNamespace())
    assert "warning.plan" not in tags
    assert not any(_stale(path) for path in [*probed.own, probed.other, probed.other_read, probed.floor_head])


def test_a_reprobed_stream_file_is_measured_again_once(
    probed: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed.runner.annotate(RunReport(tpot_s=2 * PREDICTED_S), SimpleNamespace())
    calls: list[object] = []
    monkeypatch.setattr(store, "measure_stream", lambda *a, **k: calls.append(k) or StreamTimes(0.03, 0.0))
    setup, options = probed.runner.setup, stream_options(probed.runner.cfg)
    for _ in range(2):
        times = store.load_or_measure_stream(setup.config, CPU, setup.config.dtype, probed.runner.probe_dir,
                                             options=options)
    assert len(calls) == 1 and times.layer_s == 0.03
    assert not _stale(probed.own[0])


def test_no_time_or_no_prediction_is_no_plan_warning() -> None:
    assert missed_plan(None, PREDICTED_S) is None
    assert missed_plan(PREDICTED_S, 0.0) is None
