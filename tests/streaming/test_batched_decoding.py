"""workload.batch_size: several sequences through each streamed pass, each decoding as it would alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console
from transformers import LlamaForCausalLM

from harness.config import Config
from harness.job.run import run_job
from harness.measurement.metrics import device_clock
from harness.runners.hf import generation_config, timed_generate
from harness.runners.layerbench.setup import build_setup, generate
from harness.streaming.model import Sampler
from harness.workload import batch_prompt_ids

CPU = torch.device("cpu")
PROMPTS = "[The history of computing began with,A short one,Once upon a time a machine learned to read and write]"


@pytest.mark.parametrize("options", [
    ("kv_cache=device",),
    ("kv_cache=none",),
    ("kv_cache=offload", "cache=disk"),
    ("compression=4bit", "prefetch=on", "residency=auto", "residency.layers=2"),
    ("compression=8bit", "cache=disk", "kv_cache=none", "prefetch=on"),
])
def test_each_sequence_of_a_batch_decodes_as_it_would_alone_and_as_transformers_batched(
    options: tuple[str, ...], make_cfg: Callable[..., Config]
) -> None:
    # float32: padding changes the shapes a row is computed in, and bf16 rounding of that can flip a near-tie
    # argmax (seen with 4-bit weights here: a 0.11 logit difference against a 0.06 margin). Exact in fp32.
    common = ("model.dtype=float32", "workload.max_new_tokens=6", "workload.stop_at_eos=false", *options)
    cfg = make_cfg(*common, "workload.batch_size=3", f"workload.prompts={PROMPTS}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    batch = generate(setup, cfg)
    prompts = batch_prompt_ids(setup.tokenizer, cfg.workload)
    assert len({len(p) for p in prompts}) == 3, "different lengths: the batch is left-padded"
    assert batch.prompts == prompts and len(batch.sequences) == 3 and batch.generated_ids == batch.sequences[0]
    sampler = Sampler(False, 1.0, 1.0, 0, CPU)
    for prompt, sequence in zip(prompts, batch.sequences, strict=True):
        alone = setup.model.generate(prompt, 6, sampler)
        assert sequence == alone.generated_ids
    if "compression=none" in options or not any(o.startswith("compression") for o in options):
        # transformers' batched generate with the same left padding, on the same weights.
        model = LlamaForCausalLM.from_pretrained(setup.ckpt_dir, attn_implementation="sdpa").eval()
        reference, _, _ = timed_generate(model, prompts, generation_config(6, []), CPU, device_clock(CPU))
        assert batch.sequences == reference


def test_a_sequence_ends_at_its_own_eos_and_the_batch_when_all_have(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("workload.max_new_tokens=8", "workload.stop_at_eos=false", "workload.batch_size=3",
                   f"workload.prompts={PROMPTS}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    free = generate(setup, cfg).sequences
    eos = free[1][2]  # the middle sequence's third token ends it; the others end at its first occurrence, if any
    sampler = Sampler(False, 1.0, 1.0, 0, CPU)
    stopped = setup.model.generate_batch(batch_prompt_ids(setup.tokenizer, cfg.workload), 8, sampler, [eos])

    def cut(sequence: list[int]) -> list[int]:
        return sequence[: sequence.index(eos) + 1] if eos in sequence else sequence

    assert stopped.sequences == [cut(s) for s in free]
    assert len(stopped.sequences[1]) <= 3
    assert len(stopped.token_times_s) == max(len(s) for s in stopped.sequences), "no step after the last EOS"


def test_batch_prompts_are_validated_and_default_to_cuts_of_the_shipped_text(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ValueError, match=r"workload.prompts has 1 prompts for workload.batch_size=2"):
        make_cfg("workload.batch_size=2", "workload.prompts=[only one]")
    with pytest.raises(ValueError, match="workload.batch_size=0"):
        make_cfg("workload.batch_size=0")
    cfg = make_cfg("workload.batch_size=4", "workload.prompt_tokens=12")
    setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
    prompts = batch_prompt_ids(setup.tokenizer, cfg.workload)
    assert len(prompts) == 4 and {len(p) for p in prompts} == {12} and len({tuple(p) for p in prompts}) == 4


def test_a_batched_run_logs_every_sequence_and_the_batchs_throughput(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("workload.max_new_tokens=5", "workload.stop_at_eos=false", "workload.batch_size=3",
                   f"workload.prompts={PROMPTS}", "reference.enabled=true", "tracking.enabled=true",
                   f"tracking.uri={uri}")
    report = run_job(cfg, {"workload": {"batch_size": 3}}, choices={"model": "tiny"}, overrides=[],
                     console=Console(quiet=True))
    assert report.agreement_vs_transformers == 1.0
    # 3 sequences x 4 decode steps over the decode time: three times one sequence's rate.
    assert report.decode_tokens_per_s == pytest.approx(3 / report.tpot_s, rel=1e-6)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert run.data.params["workload.batch_size"] == "3"
    generation = json.loads(Path(client.download_artifacts(run.info.run_id, "generation.json", str(tmp_path)))
                            .read_text())
    assert len(generation["sequences"]) == 3 and generation["generated_ids"] == generation["sequences"][0][
        "generated_ids"]
    assert all(len(s["generated_ids"]) == 5 and s["text"] for s in generation["sequences"])
