"""Bad input is refused by name before any work: keys no group or schema defines (with the closest valid key),
and prompts that are not valid UTF-8."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.compose import compose_config, validated
from harness.config import WorkloadConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("override", "message"), [
    ("+compresion=4bit", r"compresion is no config key \(did you mean compression\?\)"),
    ("+foo=bar", r"foo is no config key: no group or schema defines it"),
    ("+workload.colour=red", r"workload.colour is no config key"),
    ("+cache.page_cahce=cold", r"cache.page_cahce is no config key \(did you mean cache.page_cache\?\)"),
])
def test_a_key_no_group_or_schema_defines_is_refused_naming_the_closest(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validated(compose_config([override]))


def test_keys_the_schema_knows_pass() -> None:
    cfg = validated(compose_config(["+experiment=perf", "+model.config_overrides.num_hidden_layers=2"]))
    assert cfg.model.config_overrides == {"num_hidden_layers": 2}, "a dict field takes any key"


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_byte() -> None:
    undecoded = b"ab\xff\xfecd".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    with pytest.raises(ValueError, match=r"workload.prompt is not valid UTF-8 \(byte 0xff at character 2\)"):
        WorkloadConfig(prompt=undecoded)
    with pytest.raises(ValueError, match=r"workload.prompts\[1\] is not valid UTF-8"):
        WorkloadConfig(prompts=["fine", undecoded])


def test_the_cli_refuses_an_unknown_key_before_any_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "+compresion=4bit", f"paths.outputs={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "did you mean compression?" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "splits").exists(), "nothing was started"
