"""The checkpoint tests' fixtures: the local tokenizer and the tiny generated checkpoint, built once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.tokenizer import build_tokenizer
from harness.config import ModelConfig

TINY = ModelConfig(name="tiny", geometry="tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_checkpoint(TINY, tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir).eval()
