"""The in-memory reference: transformers' own generate on the same checkpoint, timed like every runner.

The ratio of the runner's per-token time to the reference's is what streaming costs on the machine at hand;
the tokens must also agree (a cheap end-to-end correctness check on every run).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from harness.measurement.hostload import HostLoad
from harness.measurement.metrics import Clock, aggregate, token_metrics
from harness.runners.hf import generation_config, timed_generate


def time_transformers_generate(
    ckpt_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    device: torch.device,
    clock: Clock,
    repeats: int = 1,
) -> tuple[list[list[int]], dict[str, float]]:
    """Greedy generate with the whole model resident; returns each sequence's tokens and `reference_*` metrics,
    the mean over `repeats` generations (the run's own `bench.repeats`: a ratio of two means, not of a mean
    and one sample)."""
    model = LlamaForCausalLM.from_pretrained(ckpt_dir, attn_implementation="sdpa").to(device).eval()
    # Warm-up, thrown away: first-call kernel selection and allocation are not generation speed.
    timed_generate(model, prompts, generation_config(2, []), device, clock)
    measured = []
    for _ in range(repeats):
        host = HostLoad()  # the loop timed at each token, as in the run's own generations
        sequences, start, times = timed_generate(
            model, prompts, generation_config(max_new_tokens, eos_token_ids), device, clock,
            on_token=lambda _, host=host: host.token(),
        )
        # The loop alone of the host's figures (absent for a generation of no token): the run reports the rest.
        loop = {k: v for k, v in host.metrics().items() if k == "host_loop_s"}
        measured.append({**token_metrics(start, times), **loop})
    del model
    return sequences, {f"reference_{k}": v for k, v in aggregate(measured).items()}


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """The fraction of greedy tokens equal position by position, over every sequence of a batch; a missing
    token counts as a disagreement."""
    longest = sum(max(len(a), len(b)) for a, b in zip(ours, reference, strict=True))
    equal = sum(x == y for a, b in zip(ours, reference, strict=True) for x, y in zip(a, b, strict=False))
    return equal / longest if longest else 1.0


def reference_metrics(
    ckpt_dir: Path,
    stop: list[int],
    prompts: list[list[int]],
    sequences: list[list[int]],
    tpot_s: float | None,
    max_new_tokens: int,
    device: torch.device,
    clock: Clock,
    repeats: int = 1,
) -> dict[str, float]:
    """transformers' resident generate on the same checkpoint and prompts (a batch padded the same way),
    under the run's stopping rule (`stop`: its EOS ids, or none), timed the same way, `repeats` times."""
    ref_sequences, metrics = time_transformers_generate(
        ckpt_dir, prompts, max_new_tokens, stop, device, clock, repeats
    )
    metrics["reference_tokens_match"] = float(ref_sequences == sequences)
    metrics["agreement_vs_transformers"] = agreement(sequences, ref_sequences)
    if tpot_s is not None and metrics.get("reference_tpot_s"):
        metrics["tpot_ratio_vs_reference"] = tpot_s / metrics["reference_tpot_s"]
    return metrics
