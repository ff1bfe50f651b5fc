"""The one-command GPU check: refuses without CUDA; its steps and table run on the CPU with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import gpucheck


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_clearly_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpucheck.main([str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written before the refusal"


def test_every_step_and_the_table_on_the_tiny_model(tmp_path: Path, outputs_dir: Path) -> None:
    out = tmp_path / "out"
    summary = gpucheck.run_check(
        out, device="cpu", model="tiny", new_tokens=2, outputs=outputs_dir, tests=False, extra=[], probe_mib=16
    )
    assert {label: r["status"] for label, r in summary["runs"].items()} == dict.fromkeys(
        (label for label, _ in gpucheck.RUNS), "FINISHED"
    )
    saved = json.loads((out / "gpucheck.json").read_text())
    assert saved["runs"]["4bit, ram"]["metrics"]["tpot_s"] > 0
    table = (out / "gpucheck.md").read_text()
    assert table.count("| FINISHED |") == len(gpucheck.RUNS)
    assert "| 4bit, disk, cold |" in table and "floor ratio" in table
    assert "peak VRAM" in table and "–" in table, "no VRAM on the CPU: absent, not 0"
