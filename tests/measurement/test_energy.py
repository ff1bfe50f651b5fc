"""Energy per token: a counter read at a generation's start, first token and end (a wrapping RAPL counter
unwrapped); absent, with the reason in energy.source, where no counter can be read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from harness.config import Config
from harness.job.run import run_job
from harness.measurement.energy import Counter, EnergyMeter, nvml_counter, rapl_counter


def scripted(readings: list[list[float]], ranges: list[float | None]) -> Counter:
    """A counter that gives `readings` in turn (joules, one value per domain)."""
    left = iter(readings)
    return Counter(lambda: next(left), ranges, "test")


def test_prefill_per_token_and_power_from_three_readings() -> None:
    meter = EnergyMeter(scripted([[100.0], [103.0], [106.0]], [None]))  # read at start, first token, end only
    meter.start()
    for _ in range(4):  # four tokens: the first ends the prefill, three decoded after it
        meter.token()
    meter.end()
    assert meter.metrics(new_tokens=4, duration_s=2.0) == pytest.approx(
        {"energy_prefill_j": 3.0, "energy_per_token_j": 1.0, "power_mean_w": 3.0})


def test_a_wrapping_counter_is_unwrapped_per_domain() -> None:
    # Package 0 wraps at 262,144 J between the first token and the last; package 1 does not.
    counter = scripted([[262_000.0, 10.0], [262_100.0, 12.0], [56.0, 14.0]], [262_144.0, 262_144.0])
    meter = EnergyMeter(counter)
    meter.start()
    meter.token()
    meter.token()  # no reading: only the first token is read, and the end
    meter.end()
    out = meter.metrics(new_tokens=2, duration_s=1.0)
    assert out["energy_prefill_j"] == pytest.approx(102.0)
    assert out["energy_per_token_j"] == pytest.approx((262_144 - 262_100 + 56) + 2.0)


def test_no_counter_measures_nothing_and_one_token_has_no_decode_energy() -> None:
    idle = EnergyMeter(None)
    idle.start()
    idle.token()
    assert idle.metrics(new_tokens=1, duration_s=1.0) == {}
    single = EnergyMeter(scripted([[0.0], [2.0]], [None]))
    single.start()
    single.token()
    assert set(single.metrics(new_tokens=1, duration_s=1.0)) == {"energy_prefill_j", "power_mean_w"}


def test_rapl_reads_package_zones_and_says_why_when_it_cannot(tmp_path: Path) -> None:
    assert rapl_counter(tmp_path / "absent").startswith("none: no RAPL counter")
    for zone, energy in (("intel-rapl:0", "5000000"), ("intel-rapl:1", "7000000")):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(energy)
        (tmp_path / zone / "max_energy_range_uj").write_text("262143328850")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subdomain (the cores): inside package 0, never added to it
    counter = rapl_counter(tmp_path)
    assert isinstance(counter, Counter) and counter.source.startswith("rapl: intel-rapl:0, intel-rapl:1")
    assert counter.read() == [5.0, 7.0] and counter.ranges_j == pytest.approx([262_143.32885] * 2)
    (tmp_path / "intel-rapl:1" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:1" / "energy_uj").mkdir()  # unreadable (root reads through file modes)
    assert "not readable" in rapl_counter(tmp_path)


def test_nvml_without_a_driver_is_a_reason_not_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a driver")
    reason = nvml_counter(torch.device("cuda", 0))
    assert isinstance(reason, str) and reason.startswith("none: NVML's energy counter is unavailable")


def test_a_job_tags_its_energy_source_and_logs_energy_only_with_one(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("tracking.enabled=true", f"tracking.uri={uri}", "workload.max_new_tokens=3", "probe.enabled=false")
    report = run_job(cfg, {}, choices={}, overrides=[])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    source = run.data.tags["energy.source"]
    if source.startswith("none"):  # no readable counter: absent, never 0
        assert report.energy_per_token_j is None and "energy_per_token_j" not in run.data.metrics
    else:
        assert source.startswith("rapl") and report.energy_per_token_j > 0


def test_nvml_counter_reads_millijoules_as_joules(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    readings = iter([1_000_000, 1_000_000, 1_002_500])  # mJ: one probe read, then two readings
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"gpu{index}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lambda handle: next(readings))
    counter = nvml_counter(torch.device("cuda", 1))
    assert isinstance(counter, Counter) and counter.source == "nvml: GPU 1 total energy counter"
    assert counter.joules(counter.read(), counter.read()) == pytest.approx(2.5)
