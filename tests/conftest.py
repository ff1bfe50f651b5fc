from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig

from harness.config import Config, compose_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def outputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One outputs dir for the session, so generated checkpoints and splits are built once."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="session")
def make_cfg(outputs_dir: Path) -> Callable[..., Config]:
    """Compose the real conf/ with overrides, as the CLI would, and validate it."""

    def make(*overrides: str) -> Config:
        common = [f"paths.outputs={outputs_dir}", "tracking.enabled=false", "probe.size_mib=16"]
        return OmegaConf.to_object(compose_config([*common, *overrides]))

    return make


@pytest.fixture(scope="session")
def ckpt(outputs_dir: Path) -> Path:
    """The tiny model's checkpoint, built once for the session."""
    from harness.checkpoints.generated import ensure_checkpoint
    from harness.config import ModelConfig

    return ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny"), outputs_dir)


@pytest.fixture(scope="session")
def config(ckpt: Path) -> LlamaConfig:
    return LlamaConfig.from_pretrained(ckpt)
