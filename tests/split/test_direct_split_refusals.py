"""The 70B geometry and models generated straight into their splits (harness.checkpoints.generated, .direct): which
models are, what their weightless checkpoint still serves (config, tokenizer, the workload), and the settings that
would read the weights they never write, each named with the numbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import harness.checkpoints.generated as generated
from harness.checkpoints.generated import (
    GENERATOR_FILE,
    ensure_checkpoint,
    generated_dir,
    llama_config_for,
    splits_directly,
    weights_bytes,
)
from harness.checkpoints.tokenizer import VOCAB_SIZE
from harness.config import Config, ModelConfig
from harness.split.direct import direct_split_conflicts, refuse_weight_readers
from harness.workload import prepare_workload

# Llama-3-70B: 70,553,706,496 parameters in bf16.
WEIGHTS_70B = 141_107_412_992


def test_the_70b_geometry(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("model=llama3-70b-synthetic")
    assert (cfg.model.geometry, cfg.model.source, cfg.model.generator_device) == ("llama3-70b", "generated", "cuda")
    c = llama_config_for(cfg.model, VOCAB_SIZE)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (8192, 80, 28672)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (64, 8, 128, 128256)
    assert (c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == (1e-5, 8192, False)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert c.dtype == torch.bfloat16
    assert weights_bytes(c) == WEIGHTS_70B


@pytest.mark.parametrize(
    ("option", "direct"),
    [("llama3-70b-synthetic", True), ("llama3-8b-synthetic", False), ("llama3.2-1b-synthetic", False),
     ("tiny", False), ("smollm2-135m", False)],
)
def test_only_a_model_too_large_to_write_is_generated_into_its_splits(
    option: str, direct: bool, make_cfg: Callable[..., Config]
) -> None:
    assert splits_directly(make_cfg(f"model={option}").model) is direct


def test_a_weightless_checkpoint_serves_the_workload(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny"), tmp_path)
    monkeypatch.setattr(generated, "DIRECT_SPLIT_BYTES", 0)
    cfg = make_cfg(f"paths.outputs={tmp_path}")
    assert generated_dir(cfg.model, tmp_path) != written, "a weightless directory has a name of its own"
    work = prepare_workload(cfg, tmp_path)
    assert work.ckpt_dir == generated_dir(cfg.model, tmp_path)
    assert (work.ckpt_dir / GENERATOR_FILE).is_file() and not list(work.ckpt_dir.glob("*.safetensors*"))
    assert work.config.num_hidden_layers == 4 and work.prompts[0] and work.stop
    assert work.tokenizer.get_vocab() == prepare_workload(make_cfg(), tmp_path, written).tokenizer.get_vocab()


def conflicts(make_cfg: Callable[..., Config], *overrides: str) -> list[str]:
    cfg = make_cfg("model=llama3-70b-synthetic", *overrides)
    return direct_split_conflicts(cfg, llama_config_for(cfg.model, VOCAB_SIZE))


def test_what_would_read_the_weights_of_a_direct_split_model_is_named(make_cfg: Callable[..., Config]) -> None:
    assert conflicts(make_cfg, "compression=4bit", "quality.enabled=false") == []
    (quality,) = conflicts(make_cfg, "compression=8bit")
    assert "quality pass compares against an uncompressed split of 141.1 GB; set quality.enabled=false" in quality
    (none,) = conflicts(make_cfg, "compression=none")
    assert "its 141.1 GB of bfloat16 weights" in none and "compression=4bit (a 42.7 GB split)" in none
    assert "compression=8bit (73.7 GB)" in none
    runner, reference = conflicts(
        make_cfg, "compression=4bit", "quality.enabled=false", "runner=transformers", "reference.enabled=true"
    )
    assert "runner=transformers loads the checkpoint's weights; use runner=layerbench" in runner
    assert "reference.enabled=false" in reference


def test_refusing_weight_readers_concerns_direct_split_models_only(make_cfg: Callable[..., Config]) -> None:
    tiny = make_cfg("reference.enabled=true", "compression=4bit")
    refuse_weight_readers(tiny)  # a written checkpoint serves them all
    big = make_cfg("model=llama3-70b-synthetic", "compression=4bit", "reference.enabled=true")
    with pytest.raises(ValueError, match=r"quality pass .*; model llama3-70b-synthetic .* reference"):
        refuse_weight_readers(big)
