"""harness.advise.quality (advise.min_top1): a compression whose logged top-1 agreement on the model is below the floor
is refused with the figure; a lossless one is never asked; a missing figure is measured once, then read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from harness.advise import quality, space
from harness.config import Config


def log_top1(uri: str, model: str, compression: str, top1: float) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quality") or client.get_experiment(client.create_experiment("quality"))
    run = client.create_run(experiment.experiment_id, tags={})
    client.log_param(run.info.run_id, "model", model)
    client.log_param(run.info.run_id, "compression", compression)
    client.log_metric(run.info.run_id, quality.METRIC, top1)
    client.set_terminated(run.info.run_id)


def test_compressions_below_the_floor_are_refused_with_their_figure(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(f"paths.outputs={tmp_path}", f"tracking.uri={uri}")
    log_top1(uri, "tiny", "4bit", 0.91)
    log_top1(uri, "tiny", "8bit", 0.99)
    measured: list[str] = []
    monkeypatch.setattr(quality, "measure_top1", lambda overrides, name: measured.append(name))
    combos = space.space(cfg, [])
    kept, refused = quality.keep_above(cfg, combos, 0.95)
    assert {c["compression"] for c in kept} == {"none", "8bit"}
    assert {r.choices["compression"] for r in refused} == {"4bit"} and len(refused) == len(combos) // 3
    assert "top-1 agreement 0.910 with the uncompressed model on tiny, below advise.min_top1=0.95" in refused[0].reason
    assert measured == [], "every lossy compression had a logged figure; the lossless one needs none"


def test_a_missing_figure_is_measured_once(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(f"paths.outputs={tmp_path}", f"tracking.uri={uri}", "compression=8bit")
    log_top1(uri, "tiny", "4bit", 0.97)
    calls: list[tuple[Sequence[str], str]] = []

    def measure(overrides: Sequence[str], name: str) -> None:
        calls.append((overrides, name))
        log_top1(uri, "tiny", name, 0.96)  # what the short run logs

    monkeypatch.setattr(quality, "measure_top1", measure)
    combos = [{**space.SEED, "compression": "8bit"}]
    kept, refused = quality.keep_above(cfg, combos, 0.95, ["model=tiny", "advise.min_top1=0.95", "compression=8bit"])
    assert kept == combos and refused == []
    assert calls == [(["model=tiny", "advise.min_top1=0.95", "compression=8bit"], "8bit")]
    assert space.job_overrides(calls[0][0]) == ["model=tiny"], "the short run keeps the job's overrides only"
