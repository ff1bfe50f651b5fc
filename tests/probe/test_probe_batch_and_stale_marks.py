"""harness.probe: a batch's compute is timed as the runner computes it (its sequences side by side) and cached under
its own key; a cache marked stale is measured again once, then read again."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_probes import cpu_rates, small_layer_config

import harness.streaming.model as streaming_model
from harness.probe import compute, store
from harness.probe.compute import measure_head_compute_s, measure_layer_compute_s
from harness.probe.links import LinkRates

CPU = torch.device("cpu")


class _Measure:
    """A stand-in for a probe measurement: counts its calls and records their keyword arguments."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: object, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if isinstance(self.value, LinkRates):
            return replace(self.value, measured_at=f"call {len(self.calls)}")
        return self.value * len(self.calls)  # each measurement tells itself apart: 1x, 2x, ...


# ---------------------------------------------------------------- a batch is priced as the runner computes it


def test_layer_probe_times_batch_sequences_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_layer_config()
    seen: list[dict[str, Any]] = []
    original = streaming_model.forward_decoder

    def spy(decoder: object, weights: object, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cache = kwargs["cache"]
        seen.append({
            "hidden": tuple(hidden.shape),
            "past": tuple(cache.layers[0].keys.shape),
            "positions": tuple(kwargs["position_ids"].shape),
        })
        return original(decoder, weights, hidden, **kwargs)

    monkeypatch.setattr(streaming_model, "forward_decoder", spy)
    layer_s = measure_layer_compute_s(config, CPU, torch.float32, seq_len=2, repeats=1, batch=3)
    assert layer_s > 0
    assert seen, "the probe did not time the runner's forward_decoder"
    # Three sequences of two new positions each, not one sequence of six; each with its own past KV cache.
    assert {s["hidden"] for s in seen} == {(3, 2, config.hidden_size)}
    assert {s["past"] for s in seen} == {(3, config.num_key_value_heads, 8, config.head_dim)}
    assert {s["positions"] for s in seen} == {(3, 2)}


def test_head_probe_computes_the_last_position_of_each_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_layer_config()
    inputs: list[tuple[int, ...]] = []
    original = streaming_model.forward_unit

    def spy(module: object, weights: object, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs.append(tuple(args[0].shape))
        return original(module, weights, *args, **kwargs)

    monkeypatch.setattr(streaming_model, "forward_unit", spy)
    assert measure_head_compute_s(config, CPU, torch.float32, repeats=1, batch=5) > 0
    assert set(inputs) == {(5, 1, config.hidden_size)}  # the final norm's input, then lm_head's


def test_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch"):
        measure_layer_compute_s(small_layer_config(), CPU, torch.float32, repeats=1, batch=0)
    with pytest.raises(ValueError, match="batch"):
        measure_head_compute_s(small_layer_config(), CPU, torch.float32, repeats=1, batch=0)


# ---------------------------------------------------------------- batch in the cache key


def test_layer_cache_key_distinguishes_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Measure(0.25)
    monkeypatch.setattr(store, "measure_layer_compute_s", fake)
    config = small_layer_config()
    one = store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path, seq_len=1)
    many = store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path, seq_len=1, batch=4)
    assert (one, many) == (0.25, 0.5)
    assert [call.get("batch") for call in fake.calls] == [1, 4]
    # Each read back from its own file, without measuring.
    assert store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path, batch=4) == 0.5
    assert store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path) == 0.25
    assert len(fake.calls) == 2
    assert len(list(tmp_path.glob("*-layer-*.json"))) == 2


def test_head_cache_key_distinguishes_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Measure(0.125)
    monkeypatch.setattr(store, "measure_head_compute_s", fake)
    config = small_layer_config()
    assert store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path) == 0.125
    assert store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path, batch=8) == 0.25
    assert store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path, batch=8) == 0.25
    assert [call.get("batch") for call in fake.calls] == [1, 8]


def test_the_plans_head_is_timed_after_an_eviction_and_cached_apart_from_the_floors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _Measure(0.125)
    monkeypatch.setattr(store, "measure_head_compute_s", fake)
    config = small_layer_config()
    config.num_hidden_layers = 4  # three other layers: something to evict with
    floor = store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path)
    plan = store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path, evicted=True)
    assert (floor, plan) == (0.125, 0.25), "two measurements"
    assert "evict" not in fake.calls[0] and callable(fake.calls[1]["evict"])
    assert store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path, evicted=True) == plan
    config.num_hidden_layers = 8
    assert store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, tmp_path, evicted=True) == 0.375, (
        "more layers evict more: another measurement"
    )


def test_an_evicted_head_is_timed_after_each_eviction_at_its_median(monkeypatch: pytest.MonkeyPatch) -> None:
    evictions: list[int] = []
    seconds = measure_head_compute_s(small_layer_config(), CPU, torch.float32, repeats=3,
                                     evict=lambda: evictions.append(1))
    assert seconds > 0 and len(evictions) == 4, "before the warm-up and each of the three timed calls"
    monkeypatch.setattr(compute, "timed_seconds", lambda *args: [3.0, 1.0, 2.0])
    assert measure_head_compute_s(small_layer_config(), CPU, torch.float32, evict=lambda: None) == 2.0


def test_single_sequence_cache_written_before_batch_was_keyed_stays_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_layer_config()
    key = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "dtype": "bfloat16", "seq_len": 1}
    name = f"{socket.gethostname()}-cpu-layer-64-128-2-1-32-bfloat16-1.json"
    (tmp_path / name).write_text(json.dumps({"key": key, "layer_compute_s": 0.75}))
    monkeypatch.setattr(store, "measure_layer_compute_s", _Measure(1.0))
    assert store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path) == 0.75
    assert store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, tmp_path, batch=1) == 0.75


# ---------------------------------------------------------------- marked stale


def _load_all(cache_dir: Path) -> tuple[LinkRates, float, float]:
    config = small_layer_config()
    return (
        store.load_or_measure(CPU, cache_dir, cache_dir),
        store.load_or_measure_layer_compute_s(config, CPU, torch.bfloat16, cache_dir, batch=2),
        store.load_or_measure_head_compute_s(config, CPU, torch.bfloat16, cache_dir, batch=2),
    )


def test_marked_stale_is_measured_again_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    links, layer, head = _Measure(cpu_rates("unused")), _Measure(0.5), _Measure(0.0625)
    monkeypatch.setattr(store, "measure_link_rates", links)
    monkeypatch.setattr(store, "measure_layer_compute_s", layer)
    monkeypatch.setattr(store, "measure_head_compute_s", head)
    _load_all(tmp_path)
    assert (len(links.calls), len(layer.calls), len(head.calls)) == (1, 1, 1)

    marked = store.mark_stale(CPU, tmp_path, "per token 1 s is below the floor 2 s")
    assert len(marked) == 3 and all(p.with_name(p.name + store.STALE_SUFFIX).is_file() for p in marked)
    assert (len(links.calls), len(layer.calls), len(head.calls)) == (1, 1, 1)  # marking measures nothing

    with caplog.at_level("WARNING", logger=store.__name__):
        second = _load_all(tmp_path)
    assert (len(links.calls), len(layer.calls), len(head.calls)) == (2, 2, 2)
    assert second[0].measured_at == "call 2" and second[1:] == (1.0, 0.125)
    assert "marked stale (per token 1 s is below the floor 2 s)" in caplog.text
    assert not list(tmp_path.glob("*" + store.STALE_SUFFIX)), "the marks are cleared once re-measured"

    assert _load_all(tmp_path) == second  # the run after that reads the cache again
    assert (len(links.calls), len(layer.calls), len(head.calls)) == (2, 2, 2)


def test_refresh_clears_a_stale_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = _Measure(cpu_rates("unused"))
    monkeypatch.setattr(store, "measure_link_rates", links)
    store.load_or_measure(CPU, tmp_path, tmp_path)
    store.mark_stale(CPU, tmp_path, "beaten")
    store.load_or_measure(CPU, tmp_path, tmp_path, refresh=True)
    assert len(links.calls) == 2
    store.load_or_measure(CPU, tmp_path, tmp_path)
    assert len(links.calls) == 2


def test_mark_stale_leaves_other_hosts_and_other_files_alone(tmp_path: Path) -> None:
    other_host = tmp_path / "another-host-cpu-layer-64-128-2-1-32-bfloat16-1.json"
    other_host.write_text("{}")
    lock = store.cache_path(CPU, tmp_path).with_name(store.cache_path(CPU, tmp_path).name + ".lock")
    lock.write_text("")
    assert store.mark_stale(CPU, tmp_path, "beaten") == []  # nothing of this host cached: nothing to mark
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, lock.name])


def test_mark_stale_on_a_missing_cache_dir_marks_nothing(tmp_path: Path) -> None:
    assert store.mark_stale(CPU, tmp_path / "never-made", "beaten") == []


def test_cached_rates_file_keeps_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mark lives beside the cache file, never in it: older readers of the rates file see what they expect."""
    monkeypatch.setattr(store, "measure_link_rates", _Measure(cpu_rates("unused")))
    rates = store.load_or_measure(CPU, tmp_path, tmp_path)
    store.mark_stale(CPU, tmp_path, "beaten")
    assert json.loads(store.cache_path(CPU, tmp_path).read_text()) == asdict(rates)
