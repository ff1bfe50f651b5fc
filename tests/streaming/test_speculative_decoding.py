"""decoding=speculative: the target's greedy tokens, bit for bit in float32 and bfloat16, whatever the draft
proposes; `decoding.verify=batched` scores the k + 1 positions in one call instead, exact in float32 only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from harness.config import Config, RunnerUnavailable
from harness.job.run import run_job
from harness.runners.layerbench.setup import build_setup, generate
from harness.streaming.model import Sampler
from harness.streaming.speculative import speculative_generate
from harness.workload import prompt_ids

CPU = torch.device("cpu")
TOKENS = ("workload.max_new_tokens=12", "workload.stop_at_eos=false")
FP32 = ("model.dtype=float32", *TOKENS)


def greedy(make_cfg: Callable[..., Config], *options: str) -> list[int]:
    cfg = make_cfg(*TOKENS, *options)
    return generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg).generated_ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft", ["null", "tiny-draft"])
def test_speculative_tokens_are_the_targets_greedy_tokens_in_its_own_dtype(
    dtype: str, k: int, draft: str, make_cfg: Callable[..., Config]
) -> None:
    cfg = make_cfg(*TOKENS, f"model.dtype={dtype}", "decoding=speculative", f"decoding.k={k}",
                   f"decoding.draft={draft}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    gen = generate(setup, cfg)
    assert gen.generated_ids == greedy(make_cfg, f"model.dtype={dtype}")
    assert setup.draft is not None and setup.draft.decoded_once
    if draft == "tiny-draft":
        # Another geometry with other weights: its proposals are rejected, so the caches were rolled back.
        assert setup.draft.model.config.hidden_size != setup.config.hidden_size
        assert gen.metrics["spec_accepted_share"] < 0.5
    # Each verifying pass yields its accepted drafts and one token of the target's own.
    passes = gen.metrics["spec_passes_per_token"] * len(gen.generated_ids)
    assert round(passes) == len(gen.timeline.passes)


def test_a_draft_equal_to_the_target_is_always_accepted(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*FP32)
    target = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    draft = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    ids = prompt_ids(target.tokenizer, cfg.workload)
    gen, stats = speculative_generate(target.model, draft.model, ids, 12, 4, Sampler(False, 1.0, 1.0, 0, CPU))
    plain = target.model.generate(ids, 12, Sampler(False, 1.0, 1.0, 0, CPU))
    assert gen.generated_ids == plain.generated_ids
    assert stats.accepted == stats.drafted and gen.metrics["spec_accepted_share"] == 1.0
    # 12 tokens: the prefill's, then passes of 4 drafts + 1: ceil(11 / 5) = 3 verifying passes.
    assert stats.verify_passes == 3


@pytest.mark.parametrize("options", [
    ("kv_cache=none",),
    ("kv_cache=offload", "cache=disk"),
    ("compression=8bit", "prefetch=on"),
    ("cache=disk", "residency=auto", "residency.layers=2"),
])
def test_every_strategy_option_works_as_the_target_in_bf16(
    options: tuple[str, ...], make_cfg: Callable[..., Config]
) -> None:
    cfg = make_cfg(*TOKENS, *options, "decoding=speculative", "decoding.k=3", "decoding.draft=tiny-draft")
    gen = generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg)
    assert gen.generated_ids == greedy(make_cfg, *options)


def test_a_batched_verify_runs_and_is_exact_in_float32(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*FP32, "decoding=speculative", "decoding.k=4", "decoding.verify=batched")
    gen = generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg)
    assert gen.generated_ids == greedy(make_cfg, "model.dtype=float32")


def test_what_speculative_decoding_cannot_do_is_refused_before_loading(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="decoding.verify"):
        make_cfg("decoding=speculative", "decoding.verify=fast")
    with pytest.raises(ValueError, match="a batch .* needs decoding.verify=exact"):
        make_cfg("decoding=speculative", "workload.batch_size=2", "decoding.verify=batched")
    with pytest.raises(ValueError, match="decoding.draft='nope' is no model option"):
        cfg = make_cfg("decoding=speculative", "decoding.draft=nope")
        build_setup(cfg, Path(cfg.paths.outputs), CPU)
    with pytest.raises(ValueError, match=r"the draft \(tiny 4bit\) needs .* vram.cap_gib"):
        cfg = make_cfg("decoding=speculative", "vram.cap_gib=0.0001", f"split.dir={tmp_path}")
        build_setup(cfg, Path(cfg.paths.outputs), CPU)
    with pytest.raises(RunnerUnavailable, match="runner=transformers cannot run decoding=speculative"):
        run_job(make_cfg("decoding=speculative", "runner=transformers"), {}, choices={"runner": "transformers"},
                overrides=[], console=Console(quiet=True))


def test_a_speculative_run_logs_its_acceptance_and_agrees_with_transformers(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*FP32, "decoding=speculative", "decoding.k=4", "reference.enabled=true")
    report = run_job(cfg, {}, choices={"model": "tiny", "decoding": "speculative"}, overrides=[],
                     console=Console(quiet=True))
    assert report.agreement_vs_transformers == 1.0
    assert 0 <= report.spec_accepted_share <= 1 and report.spec_passes_per_token <= 1
    assert report.spec_draft_bytes > 0 and 0 < report.spec_draft_share < 1
    # The plan prices a round (the verifying pass and k draft steps) over the tokens it yields at this acceptance.
    round_s = sum(getattr(report, f"plan_{term}_s") for term in ("pass", "streamed", "resident", "head"))
    round_s += 4 * report.plan_draft_step_s
    assert report.plan_draft_step_s > 0 and report.plan_draft_prefill_s > 0
    prefill = report.plan_draft_prefill_s / (cfg.workload.max_new_tokens - 1)
    assert report.plan_predicted_s == pytest.approx(round_s / (report.spec_accepted_per_pass + 1) + prefill)
    assert report.plan_ratio == pytest.approx(report.tpot_s / report.plan_predicted_s)


def test_the_speculative_preset_sweeps_decoding_and_k_from_the_cli(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "harness", "+experiment=speculative", f"paths.outputs={tmp_path}",
           "workload.max_new_tokens=5", "decoding.k=2,4", "probe.size_mib=16"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("speculative").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted((r.data.params["decoding"], r.data.params["decoding.k"]) for r in children) == [
        ("greedy", "2"), ("greedy", "4"), ("speculative", "2"), ("speculative", "4")]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.metrics["agreement_vs_transformers"] == 1.0
        assert ("spec_accepted_share" in run.data.metrics) == (run.data.params["decoding"] == "speculative")
        speculative = run.data.params["decoding"] == "speculative"
        assert ("plan_draft_step_s" in run.data.metrics) == speculative and "plan_predicted_s" in run.data.metrics
        assert (run.data.tags.get("plan.acceptance") == "measured") == speculative


@pytest.mark.parametrize("kv_cache", ["device", "none"])
def test_a_pass_of_several_steps_gives_each_steps_own_logits_bit_for_bit_in_bf16(
    kv_cache: str, make_cfg: Callable[..., Config]
) -> None:
    """forward_steps equals one pass per step exactly: positions, masks and the cache (or, without one, each step's
    whole sequence) as greedy's own passes. (On a trained model one call over all positions does not: the SmolLM2
    tests.)"""
    cfg = make_cfg(f"kv_cache={kv_cache}")
    model = build_setup(cfg, Path(cfg.paths.outputs), CPU).model
    prompt, new = [1, 50, 60, 70], [80, 90, 100, 110]

    def after_prompt() -> object:
        cache = model.kv_policy.new_cache(model.config, CPU)
        model.forward(torch.tensor([prompt]), cache)
        return cache

    def step_input(j: int) -> torch.Tensor:  # what greedy feeds its pass for the token after new[:j + 1]
        return torch.tensor([new[j:j + 1]] if kv_cache == "device" else [prompt + new[:j + 1]])

    cache = after_prompt()
    one_by_one = torch.cat([model.forward(step_input(j), cache) for j in range(len(new))])
    steps = model.forward_steps([step_input(j) for j in range(len(new))], after_prompt())
    assert torch.equal(steps, one_by_one)


PROMPTS = "workload.prompts=[The history of computing began with,Rivers carve,A short note on the weather in spring]"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("draft", ["null", "tiny-draft"])
def test_a_batch_decodes_each_sequence_as_it_would_alone(
    dtype: str, draft: str, make_cfg: Callable[..., Config]
) -> None:
    options = (*TOKENS, f"model.dtype={dtype}", "workload.batch_size=3", PROMPTS)
    cfg = make_cfg(*options, "decoding=speculative", "decoding.k=3", f"decoding.draft={draft}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    prompts = [list(p) for p in setup.prompts]
    gen = generate(setup, cfg)
    assert setup.prompts == prompts  # a generation leaves its workload's prompts as they were
    alone = []
    for prompt in setup.prompts:  # each prompt's greedy tokens, decoded by itself
        single = make_cfg(*TOKENS, f"model.dtype={dtype}")
        model = build_setup(single, Path(single.paths.outputs), CPU).model
        alone.append(model.generate(prompt, 12, Sampler(False, 1.0, 1.0, 0, CPU)).generated_ids)
    assert gen.sequences == alone
    if dtype == "float32":  # where batching itself rounds nothing away, the batch's own greedy tokens too
        assert gen.sequences == generate(build_setup(make_cfg(*options), Path(cfg.paths.outputs), CPU),
                                         make_cfg(*options)).sequences
    # One verifying pass serves the whole batch; token i is timed once every sequence has it.
    assert len(gen.token_times_s) == max(map(len, gen.sequences))
    assert gen.metrics["spec_tokens_per_pass"] >= len(setup.prompts)
