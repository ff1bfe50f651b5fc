"""What the GPU scripts share and the lease's worker process: the wheels installed offline (an optional extra only
where its wheel was brought), a peer preset's choices passed on as typed, and a worker that outlives its timeout
killed, the next request answered by a fresh one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpucheck_jobs  # noqa: E402  (scripts, not modules of the package)
import gpulease_worker  # noqa: E402


def test_a_worker_past_its_timeout_is_killed_and_the_next_request_gets_a_fresh_one(tmp_path: Path) -> None:
    worker = gpulease_worker.Worker()
    setup = {"device": "cpu", "outputs": str(tmp_path), "probe_mib": None, "refresh": False, "warm_up": False}
    try:
        # No process answers within a millisecond of its start: the request is given up and the worker killed.
        assert worker.ask("setup", 0.001, **setup) is None
        assert not worker.alive and worker.started == 1
        facts = worker.ask("setup", 300, **setup)
        assert facts is not None and facts["torch"] == torch.__version__ and facts["device"] == "cpu"
        assert worker.alive and worker.started == 2
        # A request that breaks is answered with the reason, and the worker goes on.
        broken = worker.ask("run", 300, overrides=["compression=3bit"], outputs=str(tmp_path), direct=False,
                            reference=False)
        assert broken is not None and broken["status"] == "FAILED" and "compression" in broken["reason"]
        assert worker.alive
    finally:
        worker.close()
    assert not worker.alive


@pytest.fixture()
def lacking(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """An image without hydra and airllm; the pip commands the install would run, recorded instead of run."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("hydra", "airllm") else
                        real_find_spec(name, *a))
    ran: list[list[str]] = []

    def record(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpucheck_jobs.subprocess, "run", record)
    return ran


def test_an_optional_extra_is_installed_only_where_its_wheel_was_brought(
    tmp_path: Path, lacking: list[list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    assert gpucheck_jobs.install_missing(wheels, gpucheck_jobs.OPTIONAL) == ["hydra-core"]
    assert lacking[-1][-1] == "hydra-core" and "--no-index" in lacking[-1]
    assert "airllm is not installed and" in caplog.text and "holds no wheel of it" in caplog.text
    (wheels / "airllm-4.0.0-py3-none-any.whl").write_bytes(b"")
    assert gpucheck_jobs.install_missing(wheels, gpucheck_jobs.OPTIONAL) == ["hydra-core", "airllm"]


def test_a_missing_package_without_wheels_is_refused_naming_the_fetch_script(
    tmp_path: Path, lacking: list[list[str]]
) -> None:
    with pytest.raises(SystemExit, match=r"missing hydra-core and no wheel folder .*scripts/fetch_wheels.sh"):
        gpucheck_jobs.install_missing(tmp_path / "none")
    assert lacking == []


def test_a_presets_choices_are_passed_on_as_typed() -> None:
    assert gpucheck_jobs.preset_choices("accelerate_ram") == ["cache=ram"]
    assert gpucheck_jobs.preset_choices("airllm_4bit") == ["cache=disk", "compression=4bit"]
    assert gpucheck_jobs.preset_choices("70b_4bit_disk_cold_resident") == [
        "cache=disk", "compression=4bit", "residency=auto"]  # the model is no strategy option
    with pytest.raises(gpucheck_jobs.RefusedOverrides, match="no preset .*nope.yaml"):
        gpucheck_jobs.preset_choices("nope")
