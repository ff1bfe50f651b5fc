"""A job's workload made concrete: the checkpoint, its tokenizer, the prompt ids and the stopping rule.

Every runner generates from the same `Workload`, so prompts, padding and EOS handling cannot differ between them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.loading import eos_ids, load_model_config
from harness.checkpoints.tokenizer import CORPUS_PATH
from harness.config import Config, WorkloadConfig

# The prompt length a batch cut from the shipped text gets when workload.prompt_tokens is not set.
BATCH_PROMPT_TOKENS = 16


@dataclass
class Workload:
    """What every runner generates from."""

    ckpt_dir: Path
    config: LlamaConfig
    tokenizer: PreTrainedTokenizerBase
    prompts: list[list[int]]  # the prompt ids of one generation: one, or a batch
    stop: list[int]  # the EOS ids generation stops at; none with workload.stop_at_eos=false


def prepare_workload(cfg: Config, outputs_dir: Path, ckpt_dir: Path | None = None) -> Workload:
    """The checkpoint (built when generated and absent), its tokenizer and the prompts, refused before any weight
    is read when they run past the model's positions. `ckpt_dir`: the checkpoint, when the caller has it."""
    ckpt_dir = ckpt_dir or ensure_checkpoint(cfg.model, outputs_dir)
    config = load_model_config(ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    prompts = batch_prompt_ids(tokenizer, cfg.workload)
    check_context(max(len(p) for p in prompts), cfg.workload.max_new_tokens, config, cfg.model.name)
    stop = eos_ids(config, tokenizer, ckpt_dir) if cfg.workload.stop_at_eos else []
    return Workload(ckpt_dir, config, tokenizer, prompts, stop)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, workload: WorkloadConfig) -> list[int]:
    prompt = workload.prompt
    if workload.chat:
        if not tokenizer.chat_template:
            raise ValueError("workload.chat=true but the checkpoint's tokenizer has no chat template")
        ids = list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    if workload.prompt_tokens is not None:
        # A fixed prompt length (the write-up's "8 prompt tokens") whatever the tokenizer: repeat, then cut.
        more = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        while len(ids) < workload.prompt_tokens:
            ids += more
        ids = ids[: workload.prompt_tokens]
    return ids


def batch_prompt_ids(tokenizer: PreTrainedTokenizerBase, workload: WorkloadConfig) -> list[list[int]]:
    """The prompts of one generation: `workload.prompt` alone, or a batch of `workload.batch_size`."""
    if workload.batch_size == 1:
        return [prompt_ids(tokenizer, workload)]
    if workload.prompts:
        return [prompt_ids(tokenizer, replace(workload, prompt=p)) for p in workload.prompts[: workload.batch_size]]
    length = workload.prompt_tokens or BATCH_PROMPT_TOKENS
    text = list(tokenizer(CORPUS_PATH.read_text(), add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    if len(text) < body * workload.batch_size:
        raise ValueError(
            f"the shipped text holds {len(text)} tokens, too few for workload.batch_size={workload.batch_size} "
            f"prompts of {length}: give workload.prompts or a smaller batch"
        )
    return [bos + text[i * body : (i + 1) * body] for i in range(workload.batch_size)]


def check_context(prompt_tokens: int, max_new_tokens: int, config: LlamaConfig, model_name: str) -> None:
    """Refuse a workload longer than the model's positions, before any weight is read: past them RoPE
    extrapolates and the output is garbage, which a run would log as FINISHED."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({prompt_tokens} tokens) plus workload.max_new_tokens={max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} positions, over model {model_name!r}'s maximum of {limit} "
            f"(max_position_embeddings): shorten the prompt or set workload.max_new_tokens <= "
            f"{max(limit - prompt_tokens, 0)}"
        )
