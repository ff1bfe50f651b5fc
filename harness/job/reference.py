"""transformers' own generate, timed like the runner: the in-memory reference, and every peer's loop.

The ratio of the runner's per-token time to the reference's is what streaming costs on this
machine; the tokens must also agree (a cheap end-to-end correctness check on every run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from harness.config import WorkloadConfig
from harness.measurement.hostload import HostLoad
from harness.measurement.metrics import Clock, aggregate, token_metrics


class _TokenTimes(BaseStreamer):
    """Clock readings as generate hands each new token to the host (its first put is the prompt)."""

    def __init__(self, clock: Clock, on_token: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.on_token = on_token
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(self.clock())
            if self.on_token is not None:
                self.on_token(int(value.reshape(-1)[0]))  # the first sequence's token, as the runner reports
        self._prompt_seen = True

    def end(self) -> None:
        pass


def generation_config(
    max_new_tokens: int, eos_token_ids: list[int], *, use_cache: bool = True, workload: WorkloadConfig | None = None
) -> GenerationConfig:
    """Greedy (or the workload's sampling) for exactly the runner's stopping rule: `eos_token_ids`, or none."""
    sampling = {}
    if workload is not None and workload.do_sample:
        sampling = {"do_sample": True, "temperature": workload.temperature, "top_p": workload.top_p, "top_k": None}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_ids or None,
        pad_token_id=0,
        use_cache=use_cache,
        **sampling,
    )


def timed_generate(
    model: Any,
    prompts: list[list[int]],
    gen_cfg: GenerationConfig,
    device: torch.device,
    clock: Clock,
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], float, list[float]]:
    """One `model.generate` of the prompts (left-padded, as the streaming runner pads them): each sequence's
    new tokens up to its own EOS, the clock at the start and as each step's tokens reached the host."""
    # generate() fills what a passed config leaves unset from the model's own generation_config (a
    # checkpoint's EOS ids included): replace that too, so generation stops exactly where the runner does.
    model.generation_config = gen_cfg
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[gen_cfg.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    times = _TokenTimes(clock, on_token)
    start = clock()
    out = model.generate(ids, attention_mask=mask, generation_config=gen_cfg, streamer=times)
    eos = gen_cfg.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    sequences = []
    for row in out[:, width:].tolist():
        # generate pads a sequence that ended before the others; the runner's sequence stops at its EOS.
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        sequences.append(row[:end])
    return sequences, start, times.times


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
