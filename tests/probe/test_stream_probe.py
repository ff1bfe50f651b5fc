"""harness.probe.stream: a streamed layer's cost is measured through the real pipeline and pass (the run's cache,
codec, prefetcher, KV cache and residency) as the difference between truncated models, each pass after a write as
large as a run's other layers, timed until the figure settles; its layer files are written once per codec; and it
is cached per options, re-measured when stale or old."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_probes import small_layer_config

import strategies
from harness.measurement.vram import decoded_bytes
from harness.probe import store
from harness.probe import stream as stream_mod
from harness.probe.stream import StreamTimes, measure_stream
from strategies.cache.configs import DiskCacheConfig, RamCacheConfig
from strategies.compression.base import Codec
from strategies.compression.configs import Blockwise4bitConfig, NoCompressionConfig
from strategies.kv_cache.configs import DeviceKVCacheConfig, NoKVCacheConfig
from strategies.prefetch.configs import PrefetchOffConfig, PrefetchOnConfig

CPU = torch.device("cpu")


def options(**chosen: object) -> dict[str, object]:
    return {
        "cache": RamCacheConfig(), "compression": NoCompressionConfig(), "prefetch": PrefetchOffConfig(),
        "kv_cache": DeviceKVCacheConfig(), **chosen,
    }


@pytest.mark.parametrize("chosen", [
    {},
    {"cache": DiskCacheConfig(), "compression": Blockwise4bitConfig(), "prefetch": PrefetchOnConfig()},
    {"cache": DiskCacheConfig(page_cache="cold"), "kv_cache": NoKVCacheConfig()},
], ids=["ram-none-off", "disk-4bit-on", "disk-cold-no-kv"])
def test_every_option_streams_through_the_probe(tmp_path: Path, chosen: dict[str, object]) -> None:
    times = measure_stream(
        small_layer_config(), CPU, torch.float32, scratch_dir=tmp_path, context=4, repeats=2, **options(**chosen)
    )
    assert times.layer_s > 0 and times.pass_s >= 0


def test_layer_files_are_written_once_per_codec_and_orphans_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_mod, "_WRITTEN", {})
    orphan = tmp_path / "stream-999999999-x"  # a pid no process has: its process died before removing it
    orphan.mkdir()
    written: list[str] = []
    original = stream_mod._write_units
    monkeypatch.setattr(stream_mod, "_write_units", lambda *a: written.append(a[2].split_key) or original(*a))
    for prefetch in (PrefetchOffConfig(), PrefetchOnConfig()):
        measure_stream(small_layer_config(), CPU, torch.float32, scratch_dir=tmp_path, repeats=2,
                       **options(prefetch=prefetch))
    assert written == ["none"], "the second option reuses the first one's layer files"
    assert not orphan.exists()
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith(f"stream-{os.getpid()}-") and len(list(folder.iterdir())) == 3 + stream_mod.LAYERS
    for _, (kept, _) in stream_mod._WRITTEN.items():
        kept.cleanup()


def test_a_small_decoder_is_probed_whole_and_a_large_one_from_six_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the run's decoder decodes to at most WHOLE_DECODER_BYTES, the larger truncated model has all its layers
    (and the probe writes a file for each); otherwise LAYERS, and never fewer, however few the run has."""
    config = small_layer_config()
    config.num_hidden_layers = 9
    whole = 9 * decoded_bytes(config, ["layers.0"])
    monkeypatch.setattr(stream_mod, "WHOLE_DECODER_BYTES", whole)
    assert stream_mod.layer_counts(config) == (2, 9)
    monkeypatch.setattr(stream_mod, "WHOLE_DECODER_BYTES", whole - 1)
    assert stream_mod.layer_counts(config) == (2, stream_mod.LAYERS)
    config.num_hidden_layers = 4
    assert stream_mod.layer_counts(config) == (2, stream_mod.LAYERS)

    config.num_hidden_layers = 9
    monkeypatch.setattr(stream_mod, "WHOLE_DECODER_BYTES", whole)
    monkeypatch.setattr(stream_mod, "_WRITTEN", {})
    built: list[int] = []
    truncated = stream_mod._Truncated.__init__

    def spy(self: Any, config: Any, layers: int, *args: Any) -> None:
        built.append(layers)
        truncated(self, config, layers, *args)

    monkeypatch.setattr(stream_mod._Truncated, "__init__", spy)
    measure_stream(config, CPU, torch.float32, scratch_dir=tmp_path, repeats=2, **options())
    assert built == [2, 9]
    (folder,) = tmp_path.iterdir()
    assert len(list(folder.glob("layers.*"))) == 9
    for _, (kept, _) in stream_mod._WRITTEN.items():
        kept.cleanup()


def test_resident_layers_are_never_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from strategies.cache.ram import RamCache

    fetched: list[str] = []
    original = RamCache.get

    def spy(self: RamCache, name: str) -> dict[str, torch.Tensor]:
        fetched.append(name)
        return original(self, name)

    monkeypatch.setattr(RamCache, "get", spy)
    measure_stream(small_layer_config(), CPU, torch.float32, scratch_dir=tmp_path, resident=True, repeats=2,
                   **options())
    assert fetched and not any(name.startswith("layers.") for name in fetched)


def test_a_layer_costs_what_the_pipeline_adds_per_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec whose decode takes a quarter second a unit on the passes' clock (a fake one, which nothing else moves,
    in steps a float sums exactly): the layers' difference carries it, the pass's own cost does not."""
    import harness.measurement.metrics as metrics
    from strategies.compression.none import NoCompression

    delay = 0.25
    now = [0.0]

    def slow_decode(self: Codec, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> Any:
        if layer.startswith("layers."):
            now[0] += delay
        return stored

    monkeypatch.setattr(NoCompression, "decode", slow_decode)
    monkeypatch.setattr(metrics, "device_clock", lambda device: lambda: now[0])
    times = measure_stream(small_layer_config(), CPU, torch.float32, scratch_dir=tmp_path, repeats=3, **options())
    assert times.layer_s >= delay
    # Both truncated models decode their layers the same way: the pass's own part holds no layer's decode.
    assert times.pass_s < delay


@pytest.mark.parametrize(("batch", "verify", "kv_cache"), [
    (2, "exact", DeviceKVCacheConfig()), (1, "batched", DeviceKVCacheConfig()), (2, "exact", NoKVCacheConfig()),
])
def test_a_verifying_pass_scores_k_plus_1_positions_a_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, verify: str, kv_cache: object
) -> None:
    """Speculative decoding's verifying pass: each layer runs each sequence's 4 positions (one-token steps, or one
    call of 4 when batched), and every pass starts from the same context."""
    import harness.streaming.model as model_mod

    shapes: list[tuple[int, ...]] = []
    original = model_mod.forward_decoder

    def spy(decoder: object, weights: object, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(hidden.shape[:2]))
        return original(decoder, weights, hidden, **kwargs)

    monkeypatch.setattr(stream_mod, "_WRITTEN", {})  # written in tmp_path: never left for a later test
    config = small_layer_config()
    config.vocab_size = stream_mod._VOCAB
    files = stream_mod._written_files(config, torch.float32, strategies.build(NoCompressionConfig()), tmp_path)
    model = stream_mod._Truncated(config, 2, files, CPU, options(kv_cache=kv_cache), batch, 6, False, 4, verify)
    monkeypatch.setattr(model_mod, "forward_decoder", spy)
    for _ in range(2):
        model.pass_seconds()
        if isinstance(kv_cache, NoKVCacheConfig):  # each step the whole sequence
            assert shapes == [(1, 6)] * (2 * batch * 4)
        elif verify == "exact":
            assert shapes == [(1, 1)] * (2 * batch * 4)
        else:
            assert shapes == [(1, 4)] * 2
        assert all(cache is None or cache.get_seq_length() == 6 for _, cache in model.rows)
        shapes.clear()
    with pytest.raises(ValueError, match="a batched verifying pass scores one sequence"):
        measure_stream(config, CPU, torch.float32, scratch_dir=tmp_path, batch=2, steps=4, verify="batched",
                       **options())


class _Count:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> StreamTimes:
        self.calls += 1
        return StreamTimes(layer_s=0.001 * self.calls, pass_s=0.0)


def test_the_stream_probe_is_cached_per_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = _Count()
    monkeypatch.setattr(store, "measure_stream", count)
    config = small_layer_config()

    def load(**kwargs: Any) -> StreamTimes:
        return store.load_or_measure_stream(config, CPU, torch.float32, tmp_path, **{"options": options(), **kwargs})

    first = load()
    assert load() == first and count.calls == 1, "a cached measurement is read back, not measured again"
    assert load(batch=2).layer_s != first.layer_s and count.calls == 2, "another batch is another measurement"
    assert load(options=options(prefetch=PrefetchOnConfig())) and count.calls == 3, "so are other options"
    assert load(resident=True) and count.calls == 4, "and resident layers"
    assert load() == first and count.calls == 4


def test_a_stale_or_old_stream_measurement_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = _Count()
    monkeypatch.setattr(store, "measure_stream", count)

    def load(**kwargs: Any) -> StreamTimes:
        return store.load_or_measure_stream(small_layer_config(), CPU, torch.float32, tmp_path, options=options(),
                                            **kwargs)

    load()
    (cached,) = tmp_path.glob("*-stream-*.json")
    assert store.mark_stale(CPU, tmp_path, "a run beat its floor") == [], "the floor's probes only"
    stale = cached.with_name(cached.name + store.STALE_SUFFIX)
    stale.write_text("marked by hand")
    load()
    assert count.calls == 2, "a stale measurement is measured again"
    assert not stale.exists()
    load()
    assert count.calls == 2, "and then read back"
    old = time.time() - 10 * 86400
    os.utime(cached, (old, old))
    load(max_age_s=7 * 86400)
    assert count.calls == 3, "a measurement older than probe.max_age_days is measured again"
    load(max_age_s=7 * 86400)
    assert count.calls == 3


def test_a_figure_from_other_layer_counts_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached figure differenced from other truncated models than the probe's own is not read back."""
    count = _Count()
    monkeypatch.setattr(store, "measure_stream", count)

    def load() -> StreamTimes:
        return store.load_or_measure_stream(small_layer_config(), CPU, torch.float32, tmp_path, options=options())

    monkeypatch.setattr(store, "layer_counts", lambda config: (1, 3))
    load()
    monkeypatch.setattr(store, "layer_counts", stream_mod.layer_counts)
    load()
    assert count.calls == 2
    load()
    assert count.calls == 2, "and then read back"


def test_a_damaged_stream_cache_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = _Count()
    monkeypatch.setattr(store, "measure_stream", count)
    store.load_or_measure_stream(small_layer_config(), CPU, torch.float32, tmp_path, options=options())
    (cached,) = tmp_path.glob("*-stream-*.json")
    cached.write_text('{"key": "something else", "layer_s": -1}')
    store.load_or_measure_stream(small_layer_config(), CPU, torch.float32, tmp_path, options=options())
    assert count.calls == 2


@pytest.mark.parametrize(
    ("layers", "cache_layers", "evicted_layers"), [(1, 8, 0), (4, 8, 3), (64, 8, 16)],
    ids=["no-other-layer", "other-layers", "twice-the-cache"],
)
def test_each_pass_follows_a_write_as_large_as_the_runs_other_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: int, cache_layers: int, evicted_layers: int
) -> None:
    """A run computes every other decoder layer between two turns of one, so before each pass the probe writes as
    many bytes as those layers decode to, at most twice the last-level cache; a one-layer model writes nothing."""
    config = small_layer_config()
    config.num_hidden_layers = layers
    layer_bytes = decoded_bytes(config, ["layers.0"])
    monkeypatch.setattr(stream_mod, "last_level_cache_bytes", lambda device: cache_layers * layer_bytes)
    events: list[str] = []
    fill, passes = torch.Tensor.fill_, stream_mod._Truncated.pass_seconds

    def spy_fill(tensor: torch.Tensor, value: Any) -> torch.Tensor:
        if tensor.dtype == torch.uint8:
            events.append(f"evict {tensor.numel() / layer_bytes:g}")
        return fill(tensor, value)

    monkeypatch.setattr(torch.Tensor, "fill_", spy_fill)
    monkeypatch.setattr(stream_mod._Truncated, "pass_seconds", lambda self: events.append("pass") or passes(self))
    measure_stream(config, CPU, torch.float32, scratch_dir=tmp_path, repeats=2, **options())
    assert events.count("pass") >= 2 * 2  # an untimed pass of each model, and a timed one
    before_each = [f"evict {evicted_layers}"] if evicted_layers else []
    assert events == [*before_each, "pass"] * events.count("pass")


def test_passes_are_timed_on_while_a_layers_figure_scatters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiet passes settle after the minimum rounds; passes that scatter are timed until the layer's figure is known
    to PRECISION, however short the minimum time."""
    monkeypatch.setattr(stream_mod, "MIN_SECONDS", 0.0)
    real_settled = stream_mod.settled

    def rounds_taken(scatter: float) -> int:
        """Rounds timed when one layer costs 1 s and each pass is off by up to `scatter` of a layer, either way."""
        draw = random.Random(0)
        checked: list[int] = []

        def spy(few: list[float], many: list[float], span: int) -> bool:
            checked.append(len(few))
            return real_settled(few, many, span)

        monkeypatch.setattr(stream_mod._Truncated, "pass_seconds",
                            lambda self: float(len(self.model.units) - 3) + draw.uniform(-scatter, scatter))
        monkeypatch.setattr(stream_mod, "settled", spy)
        times = measure_stream(small_layer_config(), CPU, torch.float32, scratch_dir=tmp_path, repeats=3, **options())
        assert times.layer_s == pytest.approx(1.0, rel=3 * stream_mod.PRECISION)
        return checked[-1]

    assert rounds_taken(0.0) == 3
    # Each pass off by up to a quarter of the two models' difference in layers.
    few, many = stream_mod.layer_counts(small_layer_config())
    assert 3 < rounds_taken(0.25 * (many - few)) < stream_mod.MAX_REPEATS
    assert not real_settled([1.0, 1.5, 0.5], [3.0, 3.5, 2.5], 2), "three scattered rounds are not enough"
    assert real_settled([1.0] * 3, [3.0] * 3, 2)
