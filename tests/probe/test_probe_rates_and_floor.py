"""harness.probe: link rates and layer/head compute are measured, cached (once across jobs, re-measured when
unusable), printed by its CLI; the token floor is the slowest link, not the sum."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from fake_probes import small_layer_config

from harness.probe import cli, store
from harness.probe.compute import measure_layer_compute_s
from harness.probe.floor import Floor, token_floor
from harness.probe.links import LinkRates, measure_link_rates
from harness.probe.store import load_or_measure

SMALL = 16 << 20  # 16 MiB: enough to time, small enough for a 2-core CI box


def _rates(**overrides: object) -> LinkRates:
    """Hand-made rates with round numbers, so floor arithmetic can be checked exactly."""
    base = LinkRates(
        disk_read_cold_bytes_per_s=1e9,
        page_cache_bytes_per_s=4e9,
        host_copy_bytes_per_s=10e9,
        h2d_pinned_bytes_per_s=20e9,
        h2d_pageable_bytes_per_s=5e9,
        dequant_8bit_bytes_per_s=100e9,
        dequant_4bit_bytes_per_s=50e9,
        device="cuda:0 (test GPU)",
        measured_at="2025-01-01T00:00:00+00:00",
    )
    return replace(base, **overrides)


# ---------------------------------------------------------------- measuring


@pytest.fixture(scope="module")
def cpu_rates(tmp_path_factory: pytest.TempPathFactory) -> tuple[LinkRates, Path]:
    scratch = tmp_path_factory.mktemp("scratch")
    return measure_link_rates(torch.device("cpu"), scratch, size_bytes=SMALL, repeats=2), scratch


def test_cpu_rates_are_positive_and_h2d_is_absent(cpu_rates: tuple[LinkRates, Path]) -> None:
    rates, _ = cpu_rates
    for value in (
        rates.disk_read_cold_bytes_per_s,
        rates.page_cache_bytes_per_s,
        rates.host_copy_bytes_per_s,
        rates.dequant_8bit_bytes_per_s,
        rates.dequant_4bit_bytes_per_s,
    ):
        assert value is not None and math.isfinite(value) and value > 0
    assert rates.h2d_pinned_bytes_per_s is None
    assert rates.h2d_pageable_bytes_per_s is None
    assert rates.device == "cpu"
    assert rates.measured_at


def test_scratch_file_is_removed(cpu_rates: tuple[LinkRates, Path]) -> None:
    _, scratch = cpu_rates
    assert list(scratch.iterdir()) == []


def test_rates_survive_json_round_trip(cpu_rates: tuple[LinkRates, Path]) -> None:
    rates, _ = cpu_rates
    assert store._rates_from_json(json.loads(json.dumps(asdict(rates)))) == rates


def test_layer_compute_time_is_positive() -> None:
    config = small_layer_config()
    config._attn_implementation = "eager"
    layer_s = measure_layer_compute_s(config, torch.device("cpu"), torch.float32, repeats=2)
    assert math.isfinite(layer_s) and layer_s > 0
    assert config._attn_implementation == "eager"  # the probe sets sdpa on its own copy


def test_layer_compute_handles_several_new_positions() -> None:
    layer_s = measure_layer_compute_s(small_layer_config(), torch.device("cpu"), torch.bfloat16, seq_len=4, repeats=1)
    assert layer_s > 0


# ---------------------------------------------------------------- caching


class _Counter:
    def __init__(self, rates: LinkRates) -> None:
        self.rates = rates
        self.calls = 0

    def __call__(self, device: torch.device, scratch_dir: Path, **kwargs: object) -> LinkRates:
        self.calls += 1
        return replace(self.rates, measured_at=f"call {self.calls}")


def _refuse(*args: object, **kwargs: object) -> LinkRates:
    raise AssertionError("measured again, though a usable cache file exists")


def test_load_or_measure_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    fake = _Counter(_rates(device="cpu", h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None))
    monkeypatch.setattr(store, "measure_link_rates", fake)
    first = load_or_measure(cpu, tmp_path / "cache", tmp_path / "scratch")
    assert fake.calls == 1
    path = store.cache_path(cpu, tmp_path / "cache")
    assert path.is_file() and path.name.endswith("-cpu.json")
    # No temporary file left behind (the measurement's lock file stays: flock, not its existence, locks).
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]

    monkeypatch.setattr(store, "measure_link_rates", _refuse)
    assert load_or_measure(cpu, tmp_path / "cache", tmp_path / "scratch") == first

    monkeypatch.setattr(store, "measure_link_rates", fake)
    refreshed = load_or_measure(cpu, tmp_path / "cache", tmp_path / "scratch", refresh=True)
    assert fake.calls == 2 and refreshed.measured_at == "call 2"
    assert json.loads(path.read_text())["measured_at"] == "call 2"


def test_jobs_missing_the_cache_at_once_measure_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parallel sweep's jobs start with no cached rates: one measures, the others wait and read its file."""
    cpu = torch.device("cpu")
    fake = _Counter(_rates(device="cpu", h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None))
    started = threading.Barrier(3)

    def slow_measure(device: torch.device, scratch_dir: Path, **kwargs: object) -> LinkRates:
        time.sleep(0.3)  # long enough for the other jobs to find the cache still missing
        return fake(device, scratch_dir)

    monkeypatch.setattr(store, "measure_link_rates", slow_measure)
    results: list[LinkRates] = []

    def job() -> None:
        started.wait()
        results.append(load_or_measure(cpu, tmp_path / "cache", tmp_path / "scratch"))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.calls == 1
    assert [r.measured_at for r in results] == ["call 1"] * 3


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"device": "cpu"}),  # keys missing
        json.dumps({**asdict(_rates(device="cpu")), "host_copy_bytes_per_s": None}),  # a required rate absent
        json.dumps({**asdict(_rates(device="cpu")), "disk_read_cold_bytes_per_s": -1.0}),
        json.dumps({**asdict(_rates(device="cpu")), "disk_read_cold_bytes_per_s": 1.0}),  # well-formed, absurd
        json.dumps({**asdict(_rates(device="cpu")), "host_copy_bytes_per_s": 1e17}),
        json.dumps(asdict(_rates(device="cuda:0 (another machine's GPU)"))),  # for another device
    ],
)
def test_unusable_cache_file_is_remeasured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    cpu = torch.device("cpu")
    path = store.cache_path(cpu, tmp_path)
    path.write_text(content)
    fake = _Counter(_rates(device="cpu"))
    monkeypatch.setattr(store, "measure_link_rates", fake)
    rates = load_or_measure(cpu, tmp_path, tmp_path)
    assert fake.calls == 1 and rates.measured_at == "call 1"
    assert store._rates_from_json(json.loads(path.read_text())) == rates


# ---------------------------------------------------------------- the floor


def test_floor_is_the_slowest_link_not_the_sum() -> None:
    floor = token_floor(
        disk_bytes=2e9,  # 2 s cold
        host_bytes=10e9,  # 1 s
        h2d_bytes=10e9,  # 0.5 s pinned
        dequant_bytes=50e9,  # 0.5 s at 8-bit
        compute_s=0.25,
        rates=_rates(),
        page_cache="cold",
        dequant_bits=8,
    )
    assert isinstance(floor, Floor)
    assert floor.per_link_s == pytest.approx(
        {"disk": 2.0, "host_copy": 1.0, "h2d": 0.5, "dequant": 0.5, "compute": 0.25}
    )
    assert floor.limiting == "disk"
    assert floor.floor_s == pytest.approx(2.0)


def test_floor_uses_warm_rate_unless_cold() -> None:
    common = dict(host_bytes=0, h2d_bytes=0, dequant_bytes=0, compute_s=0.1, rates=_rates())
    cold = token_floor(disk_bytes=4e9, page_cache="cold", **common)
    warm = token_floor(disk_bytes=4e9, page_cache="warm", **common)
    assert cold.per_link_s["disk"] == pytest.approx(4.0)
    assert warm.per_link_s["disk"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="page_cache"):
        token_floor(disk_bytes=4e9, page_cache="lukewarm", **common)


def test_floor_names_compute_when_it_is_slowest_and_zero_bytes_cost_nothing() -> None:
    # CPU-like rates: no h2d link at all, and no bytes on it.
    rates = _rates(h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None, device="cpu")
    floor = token_floor(
        disk_bytes=0, host_bytes=1e9, h2d_bytes=0, dequant_bytes=0, compute_s=3.0, rates=rates, page_cache="warm"
    )
    assert floor.limiting == "compute" and floor.floor_s == 3.0
    assert floor.per_link_s["disk"] == 0.0 and floor.per_link_s["h2d"] == 0.0 and floor.per_link_s["dequant"] == 0.0
    assert floor.per_link_s["host_copy"] == pytest.approx(0.1)


def test_floor_h2d_and_dequant_rates() -> None:
    common = dict(disk_bytes=0, host_bytes=0, compute_s=0.0, page_cache="warm")
    h2d = token_floor(h2d_bytes=10e9, dequant_bytes=0, rates=_rates(), **common)
    assert h2d.limiting == "h2d" and h2d.floor_s == pytest.approx(0.5)  # pinned, not pageable
    pageable_only = token_floor(h2d_bytes=10e9, dequant_bytes=0, rates=_rates(h2d_pinned_bytes_per_s=None), **common)
    assert pageable_only.floor_s == pytest.approx(2.0)
    four = token_floor(h2d_bytes=0, dequant_bytes=50e9, rates=_rates(), dequant_bits=4, **common)
    assert four.limiting == "dequant" and four.floor_s == pytest.approx(1.0)


def test_floor_rejects_bytes_on_a_missing_link_or_an_unnamed_codec() -> None:
    cpu = _rates(h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None, device="cpu")
    common = dict(disk_bytes=0, host_bytes=0, compute_s=0.0, page_cache="warm")
    with pytest.raises(ValueError, match="h2d"):
        token_floor(h2d_bytes=1e6, dequant_bytes=0, rates=cpu, **common)
    with pytest.raises(ValueError, match="dequant_bits"):
        token_floor(h2d_bytes=0, dequant_bytes=1e6, rates=cpu, **common)
    with pytest.raises(ValueError, match="dequant_bits"):
        token_floor(h2d_bytes=0, dequant_bytes=1e6, rates=cpu, dequant_bits=2, **common)


# ---------------------------------------------------------------- CLI


def test_cli_prints_cached_rates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cpu = torch.device("cpu")
    path = store.cache_path(cpu, tmp_path)
    path.write_text(
        json.dumps(asdict(_rates(device="cpu", h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None)))
    )
    monkeypatch.setattr(store, "measure_link_rates", _refuse)
    cli.main(["--device", "cpu", "--cache-dir", str(tmp_path), "--host-malloc", "glibc"])
    out = capsys.readouterr().out
    assert "disk read, cold" in out and "1.00" in out and "n/a" in out


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_rates_and_compute(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    rates = load_or_measure(cuda, tmp_path / "cache", tmp_path / "scratch", size_bytes=64 << 20, repeats=2)
    assert rates.device.startswith("cuda:") and "(" in rates.device
    for value in (
        rates.disk_read_cold_bytes_per_s,
        rates.page_cache_bytes_per_s,
        rates.host_copy_bytes_per_s,
        rates.h2d_pinned_bytes_per_s,
        rates.h2d_pageable_bytes_per_s,
        rates.dequant_8bit_bytes_per_s,
        rates.dequant_4bit_bytes_per_s,
    ):
        assert value is not None and math.isfinite(value) and value > 0
    assert list((tmp_path / "scratch").iterdir()) == []
    assert "-cuda" in store.cache_path(cuda, tmp_path / "cache").name
    assert store.cache_path(cuda, tmp_path / "cache").is_file()
    layer_s = measure_layer_compute_s(small_layer_config(), cuda, torch.bfloat16, repeats=3)
    assert math.isfinite(layer_s) and layer_s > 0
    floor = token_floor(
        disk_bytes=0,
        host_bytes=0,
        h2d_bytes=64 << 20,
        dequant_bytes=0,
        compute_s=layer_s,
        rates=rates,
        page_cache="warm",
    )
    assert floor.floor_s > 0 and floor.limiting in ("h2d", "compute")


def test_layer_compute_is_cached_per_geometry(tmp_path, monkeypatch) -> None:
    config = small_layer_config()
    first = store.load_or_measure_layer_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path)
    assert first > 0

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although a cached value exists")

    monkeypatch.setattr(store, "measure_layer_compute_s", no_measuring)
    assert store.load_or_measure_layer_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path) == first
    # Another sequence length or dtype is another measurement.
    with pytest.raises(AssertionError, match="measured again"):
        store.load_or_measure_layer_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path, seq_len=4)
    with pytest.raises(AssertionError, match="measured again"):
        store.load_or_measure_layer_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path, refresh=True)


def test_head_compute_is_measured_and_cached(tmp_path, monkeypatch) -> None:
    config = small_layer_config()
    first = store.load_or_measure_head_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path)
    assert 0 < first < 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(store, "measure_head_compute_s", no_measuring)
    assert store.load_or_measure_head_compute_s(config, torch.device("cpu"), torch.bfloat16, tmp_path) == first


def test_cli_flags_a_rate_measured_implausible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    stalled = _rates(device="cpu", h2d_pinned_bytes_per_s=None, h2d_pageable_bytes_per_s=None,
                     disk_read_cold_bytes_per_s=2.0)
    monkeypatch.setattr(store, "measure_link_rates", _Counter(stalled))
    cli.main(["--device", "cpu", "--cache-dir", str(tmp_path), "--refresh"])
    out = capsys.readouterr().out
    assert "warning: implausible rate, disk_read_cold_bytes_per_s=2 B/s is outside 1e+06-1e+15 B/s" in out
