"""harness.measurement.environment: the tags every run carries (versions, hardware, git), none empty; a CPU
quota is tagged where there is one."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest

from harness.measurement import environment
from harness.measurement.environment import environment_tags


def test_environment_tags(tmp_path: Path) -> None:
    tags = environment_tags(tmp_path)
    for key in ("version.python", "version.torch", "version.transformers", "version.mlflow", "version.hydra"):
        assert key in tags, key
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["hw.cpu_count"].isdigit()
    if sys.platform == "linux":
        assert "hw.disk" in tags
    for key, value in tags.items():
        assert isinstance(value, str) and value.strip(), key
        assert value.lower() not in ("none", "null", "0"), key
    if "git.commit" in tags:
        assert tags["git.dirty"] in ("true", "false")


@pytest.mark.parametrize(("quota", "tag"), [(1.5, "1.5"), (4.0, "4"), (None, None)])
def test_a_cpu_quota_is_tagged_and_none_is_left_out(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, tag: str | None
) -> None:
    monkeypatch.setattr(environment, "cpu_quota_cores", lambda: quota)
    assert environment.environment_tags().get("hw.cpu_quota_cores") == tag
