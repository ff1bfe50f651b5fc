"""The in-memory reference: transformers' own generate on the same checkpoint, timed like every runner.

The ratio of the runner's per-token time to the reference's is what streaming costs on the machine at hand;
the tokens must also agree (a cheap end-to-end correctness check on every run).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from harness.measurement.hostload import HostLoad
from harness.measurement.metrics import Clock, aggregate, inter_token_latencies, token_metrics
from harness.measurement.run_report import CI_SUFFIXES
from harness.measurement.stats import interval_metrics, ratio
from harness.runners.hf import generation_config, timed_generate


def time_transformers_generate(
    ckpt_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    device: torch.device,
    clock: Clock,
    repeats: int = 1,
) -> tuple[list[list[int]], list[dict[str, float]], list[float]]:
    """Greedy generate with the whole model resident, `repeats` times (the run's own `bench.repeats`, so that a
    ratio compares like with like): each sequence's tokens, each generation's token figures, and the last
    generation's inter-token gaps."""
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
    return sequences, measured, inter_token_latencies(times)


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
    tpots_s: list[float],
    gaps_s: list[float],
    max_new_tokens: int,
    device: torch.device,
    clock: Clock,
    repeats: int = 1,
) -> tuple[dict[str, float], dict[str, str]]:
    """transformers' resident generate on the same checkpoint and prompts (a batch padded the same way),
    under the run's stopping rule (`stop`: its EOS ids, or none), timed the same way, once per measured
    generation of the run (`repeats`; `tpots_s`: their per-token times; `gaps_s`: the last one's inter-token gaps).

    Returns `reference_*` metrics, the token agreement, and the run's per-token time over the reference's with
    its 95% interval; and the ratio's verdict as a tag."""
    ref_sequences, measured, ref_gaps = time_transformers_generate(
        ckpt_dir, prompts, max_new_tokens, stop, device, clock, repeats
    )
    metrics = aggregate(measured)
    metrics.update(interval_metrics(measured, ref_gaps))
    metrics = {f"reference_{k}": v for k, v in metrics.items()}
    metrics["reference_tokens_match"] = float(ref_sequences == sequences)
    metrics["agreement_vs_transformers"] = agreement(sequences, ref_sequences)
    tags = {}
    ref_tpots = [m["tpot_s"] for m in measured if "tpot_s" in m]
    if (vs := ratio(ref_tpots, tpots_s, a_gaps=ref_gaps, b_gaps=gaps_s)) is not None:
        low, high = (f"tpot_ratio_vs_reference{suffix}" for suffix in CI_SUFFIXES)
        metrics.update({"tpot_ratio_vs_reference": vs.value, low: vs.interval.low, high: vs.interval.high})
        tags["tpot_ratio_vs_reference.verdict"] = vs.verdict
    return metrics, tags
