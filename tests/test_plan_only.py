"""`python -m harness ... plan.only=true` in a subprocess: the plan is printed, with `bytes per pass: <N> GB` on a
line of its own, and the command exits 0 having built nothing (no checkpoint weights, no split, no MLflow store);
a configuration that cannot fit exits non-zero saying why, with the numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_PASS = re.compile(r"^bytes per pass: (\d+(?:\.\d+)?) GB$", re.MULTILINE)


def plan(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "harness", f"paths.outputs={tmp / 'outputs'}", "plan.only=true", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def made(tmp: Path) -> list[str]:
    """Everything under the outputs folder but the probe's cache and Hydra's own job folder."""
    outputs = tmp / "outputs"
    return sorted(p.name for p in outputs.iterdir() if p.name not in ("probe", "runs")) if outputs.exists() else []


def test_the_plan_of_the_default_model(tmp_path: Path) -> None:
    proc = plan(tmp_path, "probe.size_mib=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (per_pass,) = BYTES_PER_PASS.findall(proc.stdout)
    assert 0 < float(per_pass) < 0.01, "the tiny model's split is a few MB, all of it streamed"
    assert "resident: 0 of 4 decoder layers" in proc.stdout and "predicted per token:" in proc.stdout
    assert made(tmp_path) == []


def test_the_70b_plan_without_the_probe(tmp_path: Path) -> None:
    proc = plan(tmp_path, "model=llama3-70b-synthetic", "compression=4bit", "residency=auto", "probe.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert BYTES_PER_PASS.findall(proc.stdout) == ["41.27"]
    assert "resident: 3 of 80 decoder layers (layers.00 layers.40 layers.79)" in proc.stdout
    assert "generated straight into each split" in proc.stdout and "fits" in proc.stdout
    assert made(tmp_path) == []


def test_a_plan_that_cannot_fit_exits_non_zero_with_the_numbers(tmp_path: Path) -> None:
    proc = plan(tmp_path, "model=llama3-70b-synthetic", "compression=4bit", "prefetch=on", "probe.enabled=false")
    assert proc.returncode != 0
    assert "does not fit: this configuration needs about 4.50 GiB of device memory" in proc.stderr
    assert "over vram.cap_gib=4.0" in proc.stderr
    proc = plan(tmp_path, "model=llama3-70b-synthetic", "compression=none", "probe.enabled=false")
    assert proc.returncode != 0 and "141.1 GB" in proc.stderr and "compression=4bit (a 42.7 GB split)" in proc.stderr
    assert made(tmp_path) == []


@pytest.mark.slow
def test_the_70b_plan_from_a_fresh_outputs_folder_builds_nothing(tmp_path: Path) -> None:
    """The issue's command, the link probe and a 70B layer's compute measured on this machine included (how long
    it takes is a measurement for docs/findings.md, not a test's limit)."""
    proc = plan(tmp_path, "model=llama3-70b-synthetic", "compression=4bit", "residency=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert BYTES_PER_PASS.findall(proc.stdout) == ["41.27"]
    assert "predicted per token:" in proc.stdout
    assert made(tmp_path) == [] and (tmp_path / "outputs" / "probe").is_dir()
