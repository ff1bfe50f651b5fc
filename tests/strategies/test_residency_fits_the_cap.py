"""residency: units kept on the device for the whole run give the same tokens, fit the cap, and a count
that cannot fit is refused before anything loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import harness.measurement.vram as vram_mod
from harness.config import Config
from harness.job.run import run_job
from harness.measurement.vram import GIB, estimate_need_bytes
from harness.runners.layerbench.setup import build_setup, generate
from harness.workload import prompt_ids
from strategies.residency.auto import AutoResidency, placed
from strategies.residency.configs import AutoResidencyConfig

LAYERS = [f"layers.{i:02d}" for i in range(16)]
CPU = torch.device("cpu")


def test_placement_spreads_or_takes_an_end() -> None:
    assert placed(LAYERS, 4, "spread") == ["layers.00", "layers.05", "layers.10", "layers.15"]
    assert placed(LAYERS, 2, "first") == ["layers.00", "layers.01"]
    assert placed(LAYERS, 2, "last") == ["layers.14", "layers.15"]
    assert placed(LAYERS, 1, "spread") == ["layers.08"]
    assert placed(LAYERS, 0, "spread") == [] and placed(LAYERS, 16, "spread") == LAYERS


def test_auto_keeps_what_the_budget_holds_layers_first() -> None:
    sizes = {**dict.fromkeys(LAYERS, 100), "norm": 1, "lm_head": 300, "embed": 300}
    others = ["norm", "lm_head", "embed"]
    auto = AutoResidency(AutoResidencyConfig())
    assert len(auto.choose(LAYERS, others, sizes, 350)) == 3
    assert auto.choose(LAYERS, others, sizes, 99) == [] and auto.choose(LAYERS, others, sizes, -5) == []
    # Other units only once every decoder layer is resident, while room is left.
    assert auto.choose(LAYERS, others, sizes, 1600 + 301) == [*LAYERS, "norm", "lm_head"]
    forced = AutoResidency(AutoResidencyConfig(layers=5, placement="first"))
    assert forced.choose(LAYERS, others, sizes, 10_000) == LAYERS[:5]
    with pytest.raises(ValueError, match=r"residency.layers=5 needs .* use residency.layers<=3"):
        forced.choose(LAYERS, others, sizes, 350)
    with pytest.raises(ValueError, match="more than the model's 16 decoder layers"):
        AutoResidency(AutoResidencyConfig(layers=17)).choose(LAYERS, others, sizes, 10**9)


@pytest.mark.parametrize("cache", ["disk", "ram"])
@pytest.mark.parametrize("compression", ["none", "4bit"])
def test_resident_layers_give_the_same_tokens_and_are_not_read_again(
    cache: str, compression: str, make_cfg: Callable[..., Config]
) -> None:
    common = (f"cache={cache}", f"compression={compression}", "workload.max_new_tokens=5", "workload.stop_at_eos=false")
    plain = build_setup(make_cfg(*common), Path(make_cfg().paths.outputs), CPU)
    expected = generate(plain, make_cfg(*common), keep_logits=True)
    for extra in (("residency=auto", "residency.layers=2"), ("residency=auto", "vram.cap_gib=1")):
        cfg = make_cfg(*common, *extra)
        setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
        got = generate(setup, cfg, keep_logits=True)
        assert got.generated_ids == expected.generated_ids, extra
        assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
        resident = setup.residency.units
        assert len(resident) >= 2 and set(resident) <= set(setup.pipeline.resident)
        # The streaming cache never reads a resident unit: per pass, their bytes are gone from the reads.
        layout = setup.layout
        rows = got.timeline.rows(setup.model.stages)
        assert all(row["read_bytes"] == 0 for row in rows if row["unit"] in resident)
        if cache == "disk":
            read = sum(row["read_bytes"] for row in rows if row["pass_index"] == 1)
            # The untied embedding is looked up in its mapping, not read (test_cache).
            whole = [u for u in layout.units if u not in resident and not setup.pipeline.looks_up_on_host(u)]
            assert whole == [u for u in layout.units if u not in resident and u != "embed"]
            assert read == sum(layout.file_bytes(u) for u in whole)


def test_a_forced_count_that_cannot_fit_is_refused_before_anything_loads(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = []
    monkeypatch.setattr("harness.streaming.pipeline.LayerPipeline.keep_resident", lambda *a: loaded.append(a) or 0)
    cfg = make_cfg("residency=auto", "residency.layers=4", "vram.cap_gib=0.001")
    with pytest.raises(ValueError, match=r"residency.layers=4 needs .* under vram.cap_gib"):
        build_setup(cfg, Path(cfg.paths.outputs), CPU)
    assert not loaded


class FakeProbe:
    def __init__(self, context_bytes: int) -> None:
        self.context_bytes = context_bytes

    def process_bytes(self) -> int:
        return self.context_bytes


def test_the_fitted_count_fills_the_cap_and_never_exceeds_it(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An injected probe stands in for NVML (as the VRAM cap tests do): 1 MB of "context" counts against the cap.
    context = 1 << 20
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: FakeProbe(context))
    base = make_cfg("workload.max_new_tokens=3")
    plain = build_setup(base, Path(base.paths.outputs), CPU)
    layer_bytes = plain.layout.file_bytes("layers.00")
    need = estimate_need_bytes(plain.config, stored_fraction=plain.pipeline.codec.stored_fraction,
                               layers_ahead=0, kv_layers=4,
                               max_seq=len(prompt_ids(plain.tokenizer, base.workload)) + 3)["total"]
    for fits in (0, 1, 3):
        cap = context + need + fits * layer_bytes + layer_bytes // 2
        cfg = make_cfg("residency=auto", f"vram.cap_gib={cap / GIB}", "workload.max_new_tokens=3")
        report = run_job(cfg, {}, choices={"model": "tiny", "residency": "auto"}, overrides=[])
        assert report.resident_layers == fits
        assert report.resident_bytes + need + context <= cap


@pytest.mark.parametrize("cache", ["disk", "ram"])
def test_the_plan_predicts_the_bytes_a_pass_reads_and_a_time(cache: str, make_cfg: Callable[..., Config]) -> None:
    from harness.runners.layerbench.plan import make_plan

    for extra in ((), ("residency=auto", "residency.layers=3")):
        cfg = make_cfg(f"cache={cache}", "workload.max_new_tokens=3", *extra)
        setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
        plan = make_plan(setup, cfg, Path(cfg.paths.outputs) / "probe")
        gen = generate(setup, cfg)
        rows = gen.timeline.rows(setup.model.stages)
        decode_pass_read = sum(row["read_bytes"] for row in rows if row["pass_index"] == 1)
        assert plan.read_bytes_per_pass == decode_pass_read, extra
        assert plan.predicted_s > 0 and plan.h2d_bytes_per_pass == 0  # a CPU moves nothing to a device
        assert f"{len(setup.residency.units)} of 4 decoder layers resident" in plan.describe(0)
