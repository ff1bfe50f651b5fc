"""The VRAM cap, on CPU: an injected memory probe stands in for NVML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from transformers import LlamaConfig

import harness.measurement.vram as vram_mod
from harness.checkpoints.generated import load_geometry
from harness.job.run import run_job
from harness.measurement.vram import GIB, VramCapExceeded, check_fits, estimate_need_bytes


class FakeProbe:
    """Reports the given process memory readings in turn, then repeats the last."""

    def __init__(self, *readings_bytes: int) -> None:
        self.readings = list(readings_bytes)

    def process_bytes(self) -> int:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def llama3_8b() -> LlamaConfig:
    return LlamaConfig(**{k: v for k, v in load_geometry("llama3-8b").items() if k != "rope_scaling"})


def test_estimate_for_the_8b_geometry() -> None:
    need = estimate_need_bytes(llama3_8b(), stored_fraction=0.0, layers_ahead=0, kv_layers=32, max_seq=28)
    # The largest unit is the embedding / lm_head: 128256 x 4096 bf16 = 1.05 GB.
    assert need["weights"] == 128256 * 4096 * 2
    assert need["kv"] == 2 * 32 * 8 * 128 * 28 * 2
    check_fits(need, cap_gib=4, context_bytes=500 << 20)


def test_a_configuration_that_cannot_fit_is_refused_with_what_to_do() -> None:
    need = estimate_need_bytes(llama3_8b(), stored_fraction=0.29, layers_ahead=3, kv_layers=32, max_seq=28)
    with pytest.raises(VramCapExceeded, match=r"vram.cap_gib=4.*compression=8bit/4bit.*prefetch.depth"):
        check_fits(need, cap_gib=4, context_bytes=500 << 20)


def run_failing(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe: FakeProbe) -> dict:
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: probe)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", "workload.max_new_tokens=3")
    with pytest.raises(VramCapExceeded) as excinfo:
        run_job(cfg, {"vram": {"cap_gib": 4}}, choices={"model": "tiny"}, overrides=[])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert run.info.status == "FAILED"
    return {"reason": run.data.tags["failure_reason"], "error": str(excinfo.value), "run": run}


def test_context_over_the_cap_fails_before_loading(make_cfg, tmp_path, monkeypatch) -> None:
    out = run_failing(make_cfg, tmp_path, monkeypatch, FakeProbe(5 * GIB))
    assert "vram.cap_gib=4" in out["reason"] and "needs about" in out["reason"]
    assert "ttft_s" not in out["run"].data.metrics, "refused before any generation"


def test_peak_over_the_cap_during_the_run_fails_it(make_cfg, tmp_path, monkeypatch) -> None:
    # 100 MB of context at start, then the process reads 4.5 GiB for the rest of the run.
    out = run_failing(make_cfg, tmp_path, monkeypatch, FakeProbe(100 << 20, int(4.5 * GIB)))
    assert "exceeded the cap" in out["reason"] and "4.50 GiB" in out["reason"]


def test_under_the_cap_the_probe_peak_is_logged(make_cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: FakeProbe(100 << 20, 300 << 20))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", "workload.max_new_tokens=3", "bench.repeats=2")
    metrics = run_job(cfg, {}, choices={"model": "tiny"}, overrides=[])
    assert metrics["peak_vram_nvml_bytes"] == 300 << 20
    assert "peak_vram_allocated_bytes" not in metrics, "the allocator counters exist on CUDA only"
    # Repeats: every metric gets a spread.
    assert "ttft_s_std" in metrics and "tpot_s_cv" in metrics
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"timeline.csv", "timeline_pass.png", "token_latency.png"} <= arts
    csv_path = client.download_artifacts(run.info.run_id, "timeline.csv", str(tmp_path / "dl"))
    header, *lines = Path(csv_path).read_text().splitlines()
    assert header.split(",")[:4] == ["pass_index", "unit", "read_start_s", "read_s"]
    assert {"h2d_s", "decode_s", "compute_s", "release_s", "read_bytes", "h2d_bytes", "decode_bytes"} <= set(
        header.split(",")
    )
    assert len(lines) == 3 * 8, "3 passes x (embed, rope+mask, 4 layers, norm, lm_head)"
    png = client.download_artifacts(run.info.run_id, "timeline_pass.png", str(tmp_path / "dl"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generation = client.download_artifacts(run.info.run_id, "generation.json", str(tmp_path / "g"))
    assert len(json.loads(Path(generation).read_text())["generated_ids"]) == 3
