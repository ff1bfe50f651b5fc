"""Reading a checkpoint the way every runner and the reference read it: its config and its EOS ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PreTrainedTokenizerBase


def load_model_config(ckpt_dir: Path) -> LlamaConfig:
    config = LlamaConfig.from_pretrained(ckpt_dir)
    # Pinned rather than left to the default so the runner and the transformers reference
    # run the same attention kernel.
    config._attn_implementation = "sdpa"
    return config


def eos_ids(config: LlamaConfig, tokenizer: PreTrainedTokenizerBase, ckpt_dir: Path) -> list[int]:
    """EOS ids from generation_config.json (Llama-3-Instruct lists several), else config/tokenizer."""
    ids: Any = None
    gen_path = ckpt_dir / "generation_config.json"
    if gen_path.exists():
        ids = json.loads(gen_path.read_text()).get("eos_token_id")
    if ids is None:
        ids = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])
