"""transformers' own in-memory generate on the same checkpoint, timed like the runner.

The ratio of the runner's per-token time to this one is what streaming costs on this
machine; the tokens must also agree (a cheap end-to-end correctness check on every run).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from harness.measurement.metrics import Clock, token_metrics


class _TokenTimes(BaseStreamer):
    """Clock readings as generate hands each new token to the host (its first put is the prompt)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(self.clock())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def time_transformers_generate(
    ckpt_dir: Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: list[int],
    device: torch.device,
    clock: Clock,
) -> tuple[list[int], dict[str, float]]:
    """Greedy generate with the whole model resident; returns its tokens and `reference_*` metrics."""
    model = LlamaForCausalLM.from_pretrained(ckpt_dir, attn_implementation="sdpa").to(device).eval()
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_ids or None, pad_token_id=0
    )
    # generate() fills what a passed config leaves unset from the checkpoint's generation_config.json,
    # its EOS ids included: replace that config too, so the reference stops exactly where the runner does.
    model.generation_config = gen_cfg
    ids = torch.tensor([prompt_ids], device=device)
    # Warm-up, thrown away: first-call kernel selection and allocation are not generation speed.
    model.generate(ids, generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0))
    times = _TokenTimes(clock)
    start = clock()
    out = model.generate(ids, generation_config=gen_cfg, streamer=times)
    del model
    metrics = token_metrics(start, times.times)
    return out[0, len(prompt_ids) :].tolist(), {f"reference_{k}": v for k, v in metrics.items()}
