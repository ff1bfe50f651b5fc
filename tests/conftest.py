from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from harness.compose import compose_config, validated
from harness.config import Config
from harness.extras import installed


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-extras", action="store_true",
        help="fail, instead of skipping, a test marked `extra` whose module or program is missing (CI's second "
             "stage, after installing every extra)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.extra(module=..., program=..., install=...)`: the test needs an optional extra; without it the
    test skips, naming the line that installs it."""
    for mark in item.iter_markers("extra"):
        module, program = mark.kwargs.get("module"), mark.kwargs.get("program")
        if (module is None or installed(module)) and (program is None or shutil.which(program)):
            continue
        reason = f"needs {module or program}: {mark.kwargs['install']}"
        if item.config.getoption("--require-extras"):
            pytest.fail(f"{reason} (--require-extras: every extra should be installed here)", pytrace=False)
        pytest.skip(reason)


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
    """Compose the real conf/ with overrides, as the CLI would, and validate it. Jobs run in this process allocate
    with glibc's defaults: the test process runs hundreds of jobs, and a heap each reuse job grows (its address
    space, harness/allocator.py) would add up; jobs run through the CLI allocate as users' do."""

    def make(*overrides: str) -> Config:
        common = [
            f"paths.outputs={outputs_dir}", "tracking.enabled=false", "probe.size_mib=16", "bench.host_malloc=glibc"
        ]
        return validated(compose_config([*common, *overrides]))

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
