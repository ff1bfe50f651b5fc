"""transformers' greedy generate on a checkpoint, the reference a runner's tokens and logits must match, and the
tolerance on the logits (for tests in any folder: tests/, the rootdir conftest's folder, is on sys.path).

Tolerances: the runner calls the same transformers modules in the same order with the same dtypes, so the only
expected difference is kernel-level rounding; we allow 1e-4 (fp32) and 2e-2 (bf16, about 2 ulp at |logit| ~ 4)
absolute, relative to the largest logit magnitude.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def reference_generate(
    ckpt: Path, prompt_ids: list[int], new_tokens: int, cache_implementation: str | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy generate; `cache_implementation="static"`: on its static cache (runner.cuda_graph's)."""
    model = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    # No EOS: both sides must produce exactly `new_tokens` tokens.
    gen_cfg = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, cache_implementation=cache_implementation,
    )
    model.generation_config = gen_cfg  # else generate() takes the EOS ids of generation_config.json
    out = model.generate(
        torch.tensor([prompt_ids]),
        generation_config=gen_cfg,
    )
    generated = out.sequences[0, len(prompt_ids) :].tolist()
    return generated, [step.float() for step in out.logits]
