"""harness.runners.layerbench.plan_only: the plan made from predicted split sizes is the plan a run makes after its
split exists (same resident set, bytes and predicted time), nothing is built to make it, and a configuration that
cannot fit is refused with the numbers; the 70B geometry's plan on this CPU, with the probe stubbed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import harness.runners.layerbench.cost as cost_mod
import harness.runners.layerbench.floor as floor_mod
import harness.runners.layerbench.plan_only as plan_only_mod
from harness.config import Config
from harness.measurement.vram import GIB
from harness.probe.links import LinkRates
from harness.probe.stream import StreamTimes
from harness.runners.layerbench.plan import make_plan
from harness.runners.layerbench.plan_only import PlanRefused, plan_text, predict
from harness.runners.layerbench.setup import build_setup

CPU_RATES = LinkRates(
    device="cpu", measured_at="stub", disk_read_cold_bytes_per_s=2e9, page_cache_bytes_per_s=5e12,
    host_copy_bytes_per_s=7.5e9, h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None,
    dequant_8bit_bytes_per_s=0.7e9, dequant_4bit_bytes_per_s=1.9e9,
)


@pytest.fixture()
def stub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed link rates and compute times: the plan's arithmetic without measuring a 70B layer."""
    monkeypatch.setattr(floor_mod, "load_or_measure", lambda *a, **k: CPU_RATES)
    monkeypatch.setattr(floor_mod, "load_or_measure_layer_compute_s", lambda *a, **k: 0.17)
    monkeypatch.setattr(floor_mod, "load_or_measure_head_compute_s", lambda *a, **k: 0.19)
    monkeypatch.setattr(cost_mod, "load_or_measure_head_compute_s", lambda *a, **k: 0.19)
    monkeypatch.setattr(cost_mod, "load_or_measure_stream", lambda *a, **k: StreamTimes(layer_s=0.9, pass_s=0.01))


def built(outputs: Path) -> list[str]:
    """What a plan must not make: checkpoints, splits, an MLflow store."""
    made = ("models", "splits", "mlflow.db")
    return sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.name in made)


@pytest.mark.parametrize("cache", ["disk", "ram"])
@pytest.mark.parametrize("codec", ["none", "4bit"])
def test_the_predicted_plan_is_the_runs_plan(
    cache: str, codec: str, make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    common = [f"cache={cache}", f"compression={codec}", "residency=auto", "workload.max_new_tokens=3",
              "quality.enabled=false"]
    plain, figures = predict(make_cfg(*common, "residency.layers=0"), tmp_path)
    layer = plain.layout.file_bytes("layers.00")
    # Room for two decoder layers and a half beside streaming: the residency policy keeps two.
    cap = (figures["need"]["total"] + 2.5 * layer) / GIB
    cfg = make_cfg(*common, f"vram.cap_gib={cap}")
    predicted, _ = predict(cfg, tmp_path)
    assert built(tmp_path) == [], "predicting builds nothing"
    real = build_setup(cfg, Path(cfg.paths.outputs), predicted.device)
    assert predicted.residency.units == real.residency.units and len(real.residency.units) == 2
    assert predicted.residency.bytes == real.residency.bytes
    assert predicted.planned_device_bytes == real.planned_device_bytes, "the same device-memory estimate"
    assert {u: predicted.layout.file_bytes(u) for u in real.layout.units} == {
        u: real.layout.file_bytes(u) for u in real.layout.units
    }
    probe_dir = Path(cfg.paths.outputs) / "probe"
    ours = make_plan(predicted, cfg, probe_dir)
    theirs = make_plan(real, cfg, probe_dir)
    assert ours == theirs
    assert ours.stream_bytes_per_pass == real.layout.files_bytes(ours.streamed)


def test_a_configuration_over_the_cap_is_refused_with_the_numbers(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    with pytest.raises(PlanRefused, match=r"does not fit: this configuration needs about .* GiB .* over vram.cap_gib"):
        predict(make_cfg("vram.cap_gib=0.0001"), tmp_path)
    with pytest.raises(PlanRefused, match=r"does not fit: residency.layers=4 needs .* GiB .* residency.layers<=\d"):
        predict(make_cfg("residency=auto", "residency.layers=4", "vram.cap_gib=0.0013"), tmp_path)
    assert built(tmp_path) == []


def test_the_70b_plan_under_4_gib(
    make_cfg: Callable[..., Config], tmp_path: Path, stub_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan_only_mod, "_free_bytes", lambda folder: 30 * 10**9)  # a disk with 30 GB free
    cfg = make_cfg("model=llama3-70b-synthetic", "compression=4bit", "residency=auto", f"paths.outputs={tmp_path}")
    setup, figures = predict(cfg, tmp_path)
    plan = make_plan(setup, cfg, tmp_path / "probe")
    text = plan_text(cfg, setup, plan, figures)
    assert setup.residency.units == ["layers.00", "layers.40", "layers.79"]
    layer = setup.layout.file_bytes("layers.00")
    assert 481_000_000 < layer < 482_000_000, "a 4-bit 70B layer: 0.5 byte and 1/16 of an fp32 scale a weight"
    embed = 128256 * 8192 * 2  # stored plain, as is lm_head
    assert plan.stream_bytes_per_pass == pytest.approx(77 * layer + 2 * embed, abs=100_000)
    assert f"bytes per pass: {plan.stream_bytes_per_pass / 1e9:.4g} GB" in text
    assert "bytes per pass: 41.27 GB" in text
    # The cost model's terms: 77 streamed layers and 3 resident ones at the stream probe's 0.9 s, the pass's own
    # 0.01 s, and the head's compute (from RAM on a CPU it is neither fetched nor, stored plain, decoded).
    assert (plan.cost.streamed_s, plan.cost.resident_s) == pytest.approx((77 * 0.9, 3 * 0.9))
    assert plan.predicted_s == pytest.approx(0.01 + 80 * 0.9 + 0.19)
    assert any(line.startswith("note: a run of this configuration is refused") for line in text)
    assert "note: the split takes 42.7 GB, but 30.0 GB are free where it goes" in "\n".join(text)
    assert built(tmp_path) == []


def test_the_70b_without_compression_is_refused(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    with pytest.raises(PlanRefused, match=r"compression none would write all of them, 141.1 GB"):
        predict(make_cfg("model=llama3-70b-synthetic", "compression=none"), tmp_path)


def test_a_peer_or_a_draft_has_no_plan(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    with pytest.raises(PlanRefused, match="runner=transformers has no plan"):
        predict(make_cfg("runner=transformers"), tmp_path)
    with pytest.raises(PlanRefused, match="greedy decoding"):
        predict(make_cfg("decoding=speculative"), tmp_path)
