"""The VRAM cap, on CPU: an injected memory probe stands in for NVML; fakes stand in for CUDA and NVML."""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from transformers import LlamaConfig

import harness.measurement.vram as vram_mod
from harness.checkpoints.generated import load_geometry
from harness.job.run import run_job
from harness.measurement.memory import PeakSampler, RssSampler
from harness.measurement.vram import (
    GIB,
    DeviceAllocs,
    NvmlProbe,
    VramCapExceeded,
    VramMonitor,
    check_fits,
    estimate_need_bytes,
)


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


def test_building_a_generated_checkpoint_is_outside_the_cap_and_the_peaks(make_cfg, tmp_path, monkeypatch) -> None:
    """The GPU machine draws the 8B geometry's weights on the device, 3.2 GB at once: no part of the run. While the
    checkpoint is built the probe reads 4.5 GiB, over the cap; the run must neither fail nor log it."""
    import harness.checkpoints.generated as generated

    building, built = threading.Event(), threading.Event()
    build = generated._build

    def slow_build(model, out_dir) -> None:
        building.set()
        try:
            build(model, out_dir)
            time.sleep(0.05)  # ten of the sampler's 5 ms readings, were it running
        finally:
            building.clear()
            built.set()

    class Probe:
        def process_bytes(self) -> int:
            return int(4.5 * GIB) if building.is_set() else 300 << 20

    monkeypatch.setattr(generated, "_build", slow_build)
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: Probe())
    cfg = make_cfg(f"paths.outputs={tmp_path}", "workload.max_new_tokens=2")  # a fresh folder: built in this job
    metrics = run_job(cfg, {}, choices={"model": "tiny"}, overrides=[]).metrics()
    assert built.is_set()
    assert metrics["peak_vram_nvml_bytes"] == 300 << 20


def test_under_the_cap_the_probe_peak_is_logged(make_cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: FakeProbe(100 << 20, 300 << 20))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", "workload.max_new_tokens=3", "bench.repeats=2",
                   "reference.enabled=true")
    metrics = run_job(cfg, {}, choices={"model": "tiny"}, overrides=[]).metrics()
    assert metrics["peak_vram_nvml_bytes"] == 300 << 20
    assert metrics["nvml_read_max_s"] >= metrics["nvml_read_s"] >= 0
    assert metrics["process_cpu_share"] > 0 and 0 <= metrics["host_steal_share"] <= 1 and metrics["host_loop_s"] > 0
    # The context plus the tiny model's streaming estimate (a few MB): what the cap was checked against.
    assert 100 << 20 < metrics["vram_estimate_bytes"] < (100 << 20) + (64 << 20)
    assert "peak_vram_allocated_bytes" not in metrics, "the allocator counters exist on CUDA only"
    assert "device_allocs_per_token" not in metrics
    # Repeats: every metric gets a spread.
    assert "ttft_s_std" in metrics and "tpot_s_cv" in metrics
    assert "reference_tpot_s_std" in metrics, "transformers' reference is timed as many times, for a ratio of means"
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


def counting_reads(readings: list[int | None], then: int) -> tuple[Callable[[], int | None], threading.Event]:
    """A read function giving ``readings`` in turn, then ``then`` forever; the event is set once they are used up."""
    left = list(readings)
    used_up = threading.Event()

    def read() -> int | None:
        if left:
            return left.pop(0)
        used_up.set()
        return then

    return read, used_up


def test_peak_sampler_keeps_the_highest_reading_and_skips_none() -> None:
    read, used_up = counting_reads([10, None, 50, 30], then=20)
    with PeakSampler(read, interval_s=0) as sampler:
        assert used_up.wait(60), "the sampler thread never read"
    assert (sampler.start_bytes, sampler.peak_bytes, sampler.peak_delta_bytes) == (10, 50, 40)


def test_peak_sampler_reads_once_more_on_exit() -> None:
    # An interval longer than the block: only the entry and exit readings are taken.
    read, _ = counting_reads([10], then=70)
    with PeakSampler(read, interval_s=3600) as sampler:
        pass
    assert (sampler.start_bytes, sampler.peak_bytes) == (10, 70)


def test_peak_sampler_with_nothing_to_read_has_no_peak() -> None:
    with PeakSampler(lambda: None, interval_s=3600) as sampler:
        pass
    assert sampler.peak_bytes is None and sampler.peak_delta_bytes is None


def test_peak_sampler_raises_a_failed_read_on_exit() -> None:
    calls = []
    failed = threading.Event()

    def read() -> int:
        calls.append(1)
        if len(calls) > 1:
            failed.set()
            raise OSError("reading went away")
        return 1

    with pytest.raises(OSError, match="reading went away"):
        with PeakSampler(read, interval_s=0):
            assert failed.wait(60)


def test_rss_sampler_sees_an_allocation() -> None:
    # A fresh anonymous mapping, written: new resident pages whatever earlier tests left in malloc's
    # arenas (a bytes object could reuse freed, still-resident heap and show no growth at all).
    with RssSampler(interval_s=3600) as rss:
        held = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: RssAnon, not shmem
        held.write(b"x" * len(held))
    assert len(held) and rss.peak_delta_bytes >= 32 << 20
    held.close()


def test_vram_monitor_peak_counts_context_and_last_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: FakeProbe(100 << 20, 300 << 20))
    with VramMonitor(torch.device("cpu"), cap_gib=4, interval_s=3600) as monitor:
        pass
    metrics = monitor.metrics()
    timing = {name: metrics.pop(name) for name in ("nvml_read_s", "nvml_read_max_s")}
    assert metrics == {"peak_vram_nvml_bytes": float(300 << 20), "cuda_context_bytes": float(100 << 20)}
    assert 0 <= timing["nvml_read_s"] <= timing["nvml_read_max_s"]
    monitor.check()


def test_the_samplers_own_reading_time_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow NVML reading is host (and driver) time beside the run's: its mean and slowest are reported. Readings
    here: the context, the sampler's first, then the last on exit (an interval longer than the block)."""
    slow_s = 0.05

    class SlowSecondReading(FakeProbe):
        def process_bytes(self) -> int:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                time.sleep(slow_s)
            return super().process_bytes()

    monkeypatch.setattr(vram_mod, "default_probe", lambda device: SlowSecondReading(100 << 20))
    with VramMonitor(torch.device("cpu"), cap_gib=4, interval_s=3600) as monitor:
        pass
    metrics = monitor.metrics()
    assert metrics["nvml_read_max_s"] >= slow_s
    # Two sampler readings, one of them slow: the mean is about half the slowest, not the slowest itself.
    assert slow_s / 2 <= metrics["nvml_read_s"] < metrics["nvml_read_max_s"]


def test_the_vram_section_configures_the_monitor(make_cfg) -> None:
    cfg = make_cfg("vram.cap_gib=3", "vram.sample_interval_s=0.05", "vram.expandable_segments=false")
    monitor = VramMonitor.from_config(torch.device("cpu"), cfg.vram)
    assert (monitor.cap_bytes, monitor.interval_s, monitor.expandable_segments) == (3 * GIB, 0.05, False)
    with pytest.raises(Exception, match=r"vram.sample_interval_s=0.0 is not valid: it must be > 0"):
        make_cfg("vram.sample_interval_s=0")


@pytest.mark.parametrize(("asked", "applied"), [
    (True, ["expandable_segments:True"]), (False, ["expandable_segments:False"]), (None, []),
])
def test_the_allocators_segments_are_set_as_asked_before_the_cache_is_emptied(
    monkeypatch: pytest.MonkeyPatch, asked: bool | None, applied: list[str]
) -> None:
    """CUDA faked: the setting reaches the allocator first (the cache emptied after it), and null leaves it be."""
    calls: list[str] = []
    monkeypatch.setattr(vram_mod, "default_probe", lambda device: None)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: None)
    with VramMonitor(torch.device("cuda", 0), cap_gib=4, expandable_segments=asked):
        pass
    assert calls == [*applied, "empty_cache"]


# NVML's numbering: four GPUs, and this process holds memory on NVML's index 2 only.
NVML_UUIDS = [uuid.UUID(int=n) for n in (0xA0, 0xA1, 0xA2, 0xA3)]


class FakeNvml:
    """The few pynvml calls NvmlProbe makes; a handle is ("nvml", NVML index)."""

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        return ("nvml", index)

    def nvmlDeviceGetHandleByUUID(self, text: str) -> tuple[str, int]:
        return ("nvml", [f"GPU-{u}" for u in NVML_UUIDS].index(text))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[str, int]) -> list[SimpleNamespace]:
        held = {2: 123 << 20}
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=held[handle[1]])] if handle[1] in held else []


def test_nvml_probe_maps_the_cuda_index_through_the_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    # As with CUDA_VISIBLE_DEVICES=2,3: CUDA's device 0 is NVML's device 2, CUDA's 1 is NVML's 3.
    visible = [NVML_UUIDS[2], NVML_UUIDS[3]]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=visible[index]))
    probe = NvmlProbe(torch.device("cuda", 0))
    assert probe._handle == ("nvml", 2), "CUDA index 0 must not be taken for NVML index 0"
    assert probe.process_bytes() == 123 << 20
    assert NvmlProbe(torch.device("cuda", 1)).process_bytes() is None


def test_device_allocations_are_counted_from_the_first_token_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill pass's allocations are not counted; the later tokens' are, per token (the allocator faked)."""
    stats = {"num_device_alloc": 40, "num_alloc_retries": 1, "num_device_free": 7}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: dict(stats))
    allocs = DeviceAllocs(torch.device("cuda"))
    allocs.token()  # the first token: the prefill pass's 40 allocations and its retry are behind it
    for _ in range(3):
        stats["num_device_alloc"] += 2
        stats["num_alloc_retries"] += 1
        allocs.token()
    assert allocs.metrics() == {"device_allocs_per_token": 2.0, "device_alloc_retries_per_token": 1.0}
    one = DeviceAllocs(torch.device("cuda"))
    one.token()
    assert one.metrics() == {}, "one token has no later tokens to count over"
    assert DeviceAllocs(torch.device("cpu")).metrics() == {}
