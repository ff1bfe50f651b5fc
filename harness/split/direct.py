"""Models generated straight into their splits (generated.splits_directly): what needs the weights they never write.

Such a model's checkpoint directory has a config, a tokenizer and a generator recipe, but no weight files: its
compressed splits are drawn from the recipe unit by unit. Whatever would read its bf16 weights whole (an
uncompressed split, the quality pass that compares against one, transformers' reference, the peer runners) cannot
run; `direct_split_conflicts` names each, with the numbers, so that a job can refuse them before it measures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.checkpoints.generated import DIRECT_SPLIT_BYTES, weights_bytes

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from harness.config import Config

GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def compressed_split_sizes(config: LlamaConfig) -> str:
    """`compression=4bit (a 39.7 GB split) or compression=8bit (73.6 GB)`: the splits such a model can have, each
    at the codec's default settings."""
    from harness.split.sizes import predicted_split_bytes
    from strategies.compression.blockwise_4bit import Blockwise4bit
    from strategies.compression.blockwise_8bit import Blockwise8bit
    from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig

    four = predicted_split_bytes(config, Blockwise4bit(Blockwise4bitConfig()))
    eight = predicted_split_bytes(config, Blockwise8bit(Blockwise8bitConfig()))
    return f"compression=4bit (a {_gb(four)} split) or compression=8bit ({_gb(eight)})"


def uncompressed_refusal(name: str, config: LlamaConfig, split_key: str) -> str:
    """Why `name`, generated straight into its splits, has no split of codec `split_key` (one that stores every weight
    as generated), with the numbers and what to use instead."""
    total = weights_bytes(config)
    return (
        f"model {name} is generated straight into each compressed split: its {_gb(total)} of "
        f"{str(config.dtype).removeprefix('torch.')} weights (over the {_gb(DIRECT_SPLIT_BYTES)} a generated "
        f"checkpoint may take) are never written. A split with compression {split_key} would write all of them, "
        f"{_gb(total)}: use {compressed_split_sizes(config)}. The quality pass compares against such an "
        "uncompressed split: run this model with quality.enabled=false"
    )


def direct_split_conflicts(cfg: Config, config: LlamaConfig) -> list[str]:
    """What `cfg` asks of a model generated straight into its splits that needs its whole bf16 weights, each with
    the reason and the setting that avoids it; empty for any other model, or a config that asks nothing of them."""
    total = _gb(weights_bytes(config))
    whole = f"model {cfg.model.name} has no checkpoint weights (its {total} are generated straight into each split)"
    problems = []
    if cfg.compression.bits is None:
        problems.append(uncompressed_refusal(cfg.model.name, config, cfg.compression.name))
    elif cfg.quality.enabled:
        problems.append(
            f"{whole}: the quality pass compares against an uncompressed split of {total}; set quality.enabled=false"
        )
    if cfg.runner.name != "layerbench":
        problems.append(f"{whole}: runner={cfg.runner.name} loads the checkpoint's weights; use runner=layerbench")
    if cfg.reference.enabled:
        problems.append(f"{whole}: transformers' reference loads them; set reference.enabled=false")
    return problems


def refuse_weight_readers(cfg: Config) -> None:
    """Raise ValueError naming everything in `cfg` that needs weights a model generated straight into its splits
    never writes (`direct_split_conflicts`); nothing for any other model. A job calls it before its run exists."""
    from harness.checkpoints.generated import llama_config_for, splits_directly
    from harness.checkpoints.tokenizer import VOCAB_SIZE

    if not splits_directly(cfg.model):
        return
    if problems := direct_split_conflicts(cfg, llama_config_for(cfg.model, VOCAB_SIZE)):
        raise ValueError("; ".join(problems))
