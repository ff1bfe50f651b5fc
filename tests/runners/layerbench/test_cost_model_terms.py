"""harness.runners.layerbench.cost: a pass's predicted time is the stream probe's per-layer cost for each streamed
and each resident decoder layer, the pass's own cost, and the head, whose fetch is priced as the cache reads it and
overlaps its compute only when prefetch loads ahead (cold, each of its files as the cold read probe reads one of
that size); each term on stubbed probes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_probes import cpu_rates

import harness.runners.layerbench.cost as cost_mod
from harness.config import Config
from harness.probe.stream import StreamTimes
from harness.runners.layerbench.plan_only import predict

HEAD_S = 0.002
STREAMED = StreamTimes(layer_s=0.010, pass_s=0.001)
RESIDENT = StreamTimes(layer_s=0.004, pass_s=0.0015)


def cold_read_s(size_bytes: int) -> float:
    """The stubbed cold read probe: 1 ms a file, and 1 GB/s."""
    return 1e-3 + size_bytes / 1e9


@pytest.fixture()
def probes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The stream, head compute and cold read probes stubbed; the stream probe's calls, by keyword, the head's,
    by keyword under "head", and the cold read probe's, as (cache, size) under "read"."""
    calls: list[dict[str, Any]] = []

    def stream(*args: object, **kwargs: Any) -> StreamTimes:
        calls.append(kwargs)
        return RESIDENT if kwargs["resident"] else STREAMED

    def read(cache: object, device: object, size_bytes: int, *args: object) -> float:
        calls.append({"read": (cache, size_bytes)})
        return cold_read_s(size_bytes)

    def head(*args: object, **kwargs: Any) -> float:
        calls.append({"head": kwargs})
        return HEAD_S

    monkeypatch.setattr(cost_mod, "load_or_measure_stream", stream)
    monkeypatch.setattr(cost_mod, "load_or_measure_head_compute_s", head)
    monkeypatch.setattr(cost_mod, "load_or_measure_cold_read_s", read)
    return calls


def cost(make_cfg: Callable[..., Config], tmp_path: Path, *overrides: str) -> tuple[cost_mod.TokenCost, Any]:
    cfg = make_cfg(f"paths.outputs={tmp_path}", "workload.prompt_tokens=8", "workload.max_new_tokens=8", *overrides)
    setup, _ = predict(cfg, tmp_path)
    return cost_mod.token_cost(setup, cfg, cpu_rates(), tmp_path / "probe"), setup


def test_streamed_layers_the_pass_and_the_head_add_up(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    terms, setup = cost(make_cfg, tmp_path, "cache=ram", "compression=none", "prefetch=off")
    layers = setup.config.num_hidden_layers
    assert terms.streamed_s == pytest.approx(layers * STREAMED.layer_s)
    assert (terms.resident_s, terms.pass_s) == (0.0, STREAMED.pass_s)
    assert terms.head_s == pytest.approx(HEAD_S), "held in RAM on a CPU, the head is computed in place"
    assert terms.total_s == pytest.approx(STREAMED.pass_s + layers * STREAMED.layer_s + HEAD_S)
    # The probe is asked for the run's own options, batch and context: the mean position of the generation.
    (head, call) = probes
    assert call["options"]["compression"].name == "none" and call["options"]["cache"].name == "ram"
    assert (call["batch"], call["context"], call["resident"]) == (1, 12, False)
    assert head["head"]["evicted"] and head["head"]["batch"] == 1, "the head as a run computes it, after its layers"


def test_a_cold_head_is_each_file_read_as_the_cache_reads_it_after_its_compute_without_prefetch(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    terms, setup = cost(make_cfg, tmp_path, "cache=disk", "cache.page_cache=cold", "prefetch=off")
    sizes = [setup.layout.file_bytes(unit) for unit in ("norm", "lm_head")]
    assert terms.head_s == pytest.approx(HEAD_S + sum(map(cold_read_s, sizes)))
    reads = [call["read"] for call in probes if "read" in call]
    assert [size for _, size in reads] == sizes, "one read probe per file, at the file's own size"
    assert all(cache.cold and cache.name == "disk" for cache, _ in reads), "with the run's own cache"


def test_a_file_two_head_units_share_is_read_once(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    cfg = make_cfg(f"paths.outputs={tmp_path}", "cache=disk", "cache.page_cache=cold", "prefetch=off")
    setup, _ = predict(cfg, tmp_path)
    manifest = setup.layout.manifest
    del manifest["files"]["lm_head"]
    manifest.setdefault("aliases", {})["lm_head"] = "norm"  # as a tied lm_head names embed's file
    head_s = cost_mod.head_seconds(setup, cfg, cpu_rates(), HEAD_S, None, tmp_path / "probe")
    assert head_s == pytest.approx(HEAD_S + cold_read_s(setup.layout.file_bytes("norm")))
    assert len([call for call in probes if "read" in call]) == 1


def test_prefetch_overlaps_the_heads_fetch_with_its_compute(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    terms, setup = cost(make_cfg, tmp_path, "cache=disk", "cache.page_cache=cold", "prefetch=on")
    fetch = sum(cold_read_s(setup.layout.file_bytes(unit)) for unit in ("norm", "lm_head"))
    assert terms.head_s == pytest.approx(max(HEAD_S, fetch))


def test_a_warm_head_is_read_at_the_kept_mappings_rate(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    terms, setup = cost(make_cfg, tmp_path, "cache=disk", "prefetch=off")
    head_bytes = setup.layout.files_bytes(["norm", "lm_head"])
    assert terms.head_s == pytest.approx(HEAD_S + head_bytes / cpu_rates().page_cache_bytes_per_s)
    assert not [call for call in probes if "read" in call], "no cold read is probed for a warm run"


def test_resident_layers_are_priced_by_the_resident_probe(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    terms, setup = cost(make_cfg, tmp_path, "residency=auto")
    layers = setup.config.num_hidden_layers
    assert sum(u.startswith("layers.") for u in setup.residency.units) == layers, "the tiny model fits whole"
    assert (terms.streamed_s, terms.resident_s) == (0.0, pytest.approx(layers * RESIDENT.layer_s))
    assert terms.pass_s == RESIDENT.pass_s
    streamed = [call["resident"] for call in probes if "resident" in call]
    assert streamed == [True], "nothing streams: only the resident layers are probed"


def test_a_batch_and_a_model_without_kv_cache_are_probed_as_they_run(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    cost(make_cfg, tmp_path, "workload.batch_size=3", "kv_cache=none")
    (head, call) = probes
    assert call["batch"] == 3 and call["options"]["kv_cache"].name == "none"
    assert head["head"]["batch"] == 3, "the head computes each sequence's last position"


def test_a_compressed_head_is_decoded_at_its_codecs_rate(
    make_cfg: Callable[..., Config], tmp_path: Path, probes: list[dict[str, Any]]
) -> None:
    from harness.measurement.vram import decoded_bytes

    terms, setup = cost(make_cfg, tmp_path, "compression=4bit", "compression.compress_embeddings=true")
    decode = decoded_bytes(setup.config, ["lm_head"]) / cpu_rates().dequant_4bit_bytes_per_s
    assert terms.head_s == pytest.approx(HEAD_S + decode)
    plain, _ = cost(make_cfg, tmp_path, "compression=4bit")
    assert plain.head_s == pytest.approx(HEAD_S), "stored plain (the default), lm_head is not decoded"
