"""harness.runners.layerbench.cost.speculative_cost: a speculative round is the target's verifying pass, probed at
k + 1 positions a sequence, plus k steps of each sequence's resident draft, probed in the form the draft holds; a
token costs the round over the tokens it yields, and a share of the draft's prefill. Each term on stubbed probes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fake_probes import cpu_rates

import harness.runners.layerbench.cost as cost_mod
import strategies
from harness.config import Config
from harness.measurement.vram import decoded_bytes
from harness.probe.stream import StreamTimes
from harness.runners.layerbench.draft import held_options
from harness.runners.layerbench.plan import Plan
from harness.runners.layerbench.plan_only import predict
from strategies.compression.configs import Blockwise4bitConfig, NoCompressionConfig

VERIFY = StreamTimes(layer_s=0.030, pass_s=0.002)
DRAFT = StreamTimes(layer_s=0.001, pass_s=0.0005)
DRAFT_PREFILL = StreamTimes(layer_s=0.004, pass_s=0.001)  # the draft's call over the prompt and one token
HEAD_S = {1: 0.001, 4: 0.003, 8: 0.005}  # the head's compute, by rows


@pytest.fixture()
def probes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """The stream and head probes stubbed; their calls, by keyword."""
    calls: dict[str, list[dict[str, Any]]] = {"stream": [], "head": []}

    def stream(*args: object, **kwargs: Any) -> StreamTimes:
        calls["stream"].append(kwargs)
        if not kwargs["resident"]:
            return VERIFY
        return DRAFT_PREFILL if kwargs.get("steps", 1) > 1 else DRAFT

    def head(*args: object, batch: int = 1, **kwargs: Any) -> float:
        calls["head"].append({"batch": batch, **kwargs})
        return HEAD_S[batch]

    monkeypatch.setattr(cost_mod, "load_or_measure_stream", stream)
    monkeypatch.setattr(cost_mod, "load_or_measure_head_compute_s", head)
    return calls


def with_draft(make_cfg: Callable[..., Config], tmp_path: Path, held_as: object, *overrides: str) -> tuple[Any, Config]:
    """The tiny model's predicted setup, with a draft of its own geometry held as `held_as`."""
    cfg = make_cfg(f"paths.outputs={tmp_path}", "workload.prompt_tokens=8", "workload.max_new_tokens=8", *overrides)
    setup, _ = predict(cfg, tmp_path)
    model = SimpleNamespace(config=setup.config, pipeline=SimpleNamespace(codec=strategies.build(held_as)))
    draft = SimpleNamespace(model=model, options=held_options(held_as))
    return dataclasses.replace(setup, draft=draft), dataclasses.replace(
        cfg, decoding=dataclasses.replace(cfg.decoding, name="speculative", k=3)
    )


def test_a_round_is_the_verifying_pass_and_k_draft_steps(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: dict[str, list[dict[str, Any]]]
) -> None:
    setup, cfg = with_draft(make_cfg, tmp_path, NoCompressionConfig(), "cache=ram", "compression=none")
    spec = cost_mod.speculative_cost(setup, cfg, cpu_rates(), tmp_path / "probe")
    layers = setup.config.num_hidden_layers
    assert spec.verify.streamed_s == pytest.approx(layers * VERIFY.layer_s)
    assert spec.verify.head_s == pytest.approx(HEAD_S[4]), "the head scores each of the k + 1 positions"
    assert spec.draft_step_s == pytest.approx(DRAFT.pass_s + layers * DRAFT.layer_s + HEAD_S[1])
    assert spec.round_s == pytest.approx(spec.verify.total_s + 3 * spec.draft_step_s)
    verify, draft, prefill = probes["stream"]
    assert (verify["steps"], verify["verify"], verify["resident"]) == (4, "exact", False)
    assert verify["options"]["cache"].name == "ram", "the target is probed with the run's own options"
    assert all(call["evicted"] for call in probes["head"]), "each head as the run computes it, after its layers"
    assert (draft["resident"], draft.get("steps", 1)) == (True, 1)
    assert draft["options"]["compression"].name == "none" and draft["options"]["prefetch"].name == "off"


def test_the_drafts_prefill_is_one_call_over_the_prompt_spread_over_the_tokens(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: dict[str, list[dict[str, Any]]]
) -> None:
    """Each sequence's draft reads the prompt and the first token in one call before its first round; that falls
    between token 1 and the last, so each of their 7 gaps (8 new tokens) carries a seventh of it."""
    setup, cfg = with_draft(make_cfg, tmp_path, NoCompressionConfig())
    spec = cost_mod.speculative_cost(setup, cfg, cpu_rates(), tmp_path / "probe")
    layers, prompt = setup.config.num_hidden_layers, max(len(p) for p in setup.prompts) + 1
    assert spec.draft_prefill_s == pytest.approx(DRAFT_PREFILL.pass_s + layers * DRAFT_PREFILL.layer_s + HEAD_S[1])
    prefill = probes["stream"][2]
    assert (prefill["steps"], prefill["verify"], prefill["resident"]) == (prompt, "batched", True)
    assert prefill["options"] == probes["stream"][1]["options"], "the draft's own options, as for a step"
    assert spec.per_token_s(1.5) == pytest.approx(spec.round_s / 2.5 + spec.draft_prefill_s / 7)


def test_a_batch_drafts_each_sequence_and_verifies_all_in_one_pass(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: dict[str, list[dict[str, Any]]]
) -> None:
    setup, cfg = with_draft(make_cfg, tmp_path, NoCompressionConfig(), "workload.batch_size=2")
    spec = cost_mod.speculative_cost(setup, cfg, cpu_rates(), tmp_path / "probe")
    assert spec.round_s == pytest.approx(spec.verify.total_s + 2 * 3 * spec.draft_step_s)
    assert spec.per_token_s(0) == pytest.approx(spec.round_s + 2 * spec.draft_prefill_s / 7), "a prefill a sequence"
    assert spec.verify.head_s == pytest.approx(HEAD_S[8])
    assert probes["stream"][0]["batch"] == 2


def test_a_draft_held_stored_decodes_its_head_each_step(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: dict[str, list[dict[str, Any]]]
) -> None:
    setup, cfg = with_draft(make_cfg, tmp_path, Blockwise4bitConfig(compress_embeddings=True))
    spec = cost_mod.speculative_cost(setup, cfg, cpu_rates(), tmp_path / "probe")
    decode = decoded_bytes(setup.config, ["lm_head"]) / cpu_rates().dequant_4bit_bytes_per_s
    layers = setup.config.num_hidden_layers
    assert spec.draft_step_s == pytest.approx(DRAFT.pass_s + layers * DRAFT.layer_s + HEAD_S[1] + decode)
    assert probes["stream"][1]["options"]["compression"].name == "4bit"


def test_the_plan_prices_a_token_at_the_acceptance_given_and_none_accepted_until_then(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: dict[str, list[dict[str, Any]]]
) -> None:
    setup, cfg = with_draft(make_cfg, tmp_path, NoCompressionConfig())
    spec = cost_mod.speculative_cost(setup, cfg, cpu_rates(), tmp_path / "probe")
    plan = Plan([], [], 0.0, 0.0, spec.verify, "compute", speculative=spec)
    prefill = spec.draft_prefill_s / 7
    assert plan.predicted_s == pytest.approx(spec.round_s + prefill), "unknown acceptance: one token a round"
    assert "none of 3 drafts accepted" in plan.describe(0)
    plan.accepted_per_pass = 2.0
    assert plan.predicted_s == pytest.approx(spec.round_s / 3 + prefill)
    terms = plan.terms()
    assert (terms["plan_draft_step_s"], terms["plan_draft_prefill_s"]) == (spec.draft_step_s, spec.draft_prefill_s)


def test_an_acceptance_outside_zero_to_k_is_refused(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ValueError, match=r"decoding.accepted_per_pass=5.0 is not a count of the k=4 drafts"):
        make_cfg("decoding=speculative", "decoding.accepted_per_pass=5")
