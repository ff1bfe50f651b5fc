"""kv_cache=quantized: runs with every other option, holds fewer bytes, is priced by the VRAM estimate, and its
quality against a plain cache is measured."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

import strategies
from harness.config import Config
from harness.job.run import run_job
from harness.measurement.vram import VramCapExceeded, check_fits, estimate_need_bytes
from harness.runners.layerbench.setup import build_setup, generate
from strategies.kv_cache.base import cache_bytes
from strategies.kv_cache.configs import DeviceKVCacheConfig, QuantizedKVCacheConfig

CPU = torch.device("cpu")
LONG = ("workload.prompt_tokens=120", "workload.max_new_tokens=20", "workload.stop_at_eos=false")


@pytest.mark.parametrize(
    ("cache_", "compression", "prefetch", "residency"),
    COMBINATIONS := list(itertools.product(["disk", "ram"], ["none", "8bit", "4bit"], ["off", "on"], ["none", "auto"])),
    ids=["-".join(c) for c in COMBINATIONS],
)
def test_a_quantized_cache_runs_with_every_other_option(
    make_cfg: Callable[..., Config], cache_: str, compression: str, prefetch: str, residency: str
) -> None:
    cfg = make_cfg(f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}", f"residency={residency}",
                   "kv_cache=quantized", "kv_cache.residual=4", "workload.max_new_tokens=8",
                   "workload.stop_at_eos=false")
    gen = generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg)
    assert len(gen.generated_ids) == 8 and gen.kv_cache_tokens == len(gen.prompt_ids) + 7
    assert gen.kv_cache_bytes > 0


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_quantized_cache_holds_fewer_bytes_and_the_estimate_counts_them(
    make_cfg: Callable[..., Config], bits: int
) -> None:
    def held(*options: str) -> tuple[int, int]:
        cfg = make_cfg(*LONG, *options)
        setup = build_setup(cfg, Path(cfg.paths.outputs), CPU)
        gen = generate(setup, cfg)
        return gen.kv_cache_bytes, gen.kv_cache_tokens

    plain, positions = held("kv_cache=device")
    quantized, same = held("kv_cache=quantized", f"kv_cache.bits={bits}", "kv_cache.residual=16")
    assert same == positions
    assert quantized < plain * (0.6 if bits == 8 else 0.5)
    # The VRAM estimate's count of the same cache, from the policy: never less than the cache held, and more
    # only by the residual window's unquantized positions, which it counts as full.
    config = build_setup(make_cfg(*LONG), Path(make_cfg().paths.outputs), CPU).config
    values = 2 * config.num_key_value_heads * config.head_dim
    policy = strategies.build(QuantizedKVCacheConfig(bits=bits, residual=16))
    predicted = config.num_hidden_layers * policy.held_bytes(values, positions, 2)
    window = 0 if bits == 8 else config.num_hidden_layers * values * 16 * 2
    assert quantized <= predicted <= quantized + window
    assert config.num_hidden_layers * strategies.build(DeviceKVCacheConfig()).held_bytes(values, positions, 2) == plain


def test_no_cache_holds_nothing_and_says_so(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("kv_cache=none", "workload.max_new_tokens=3")
    assert generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg).kv_cache_bytes == 0
    assert cache_bytes(None) == 0


def test_a_long_context_that_fits_only_quantized_is_refused_plain_with_the_numbers(
    make_cfg: Callable[..., Config]
) -> None:
    config = build_setup(make_cfg(), Path(make_cfg().paths.outputs), CPU).config

    def need(kv: object) -> dict[str, int]:
        return estimate_need_bytes(config, stored_fraction=0.0, layers_ahead=0, kv_layers=config.num_hidden_layers,
                                   max_seq=200_000, kv_held=strategies.build(kv).held_bytes)

    plain, quantized = need(DeviceKVCacheConfig()), need(QuantizedKVCacheConfig(bits=4))
    cap_gib = (plain["total"] + quantized["total"]) / 2 / 2**30
    check_fits(quantized, cap_gib, 0)
    with pytest.raises(VramCapExceeded, match=r"kv [\d.]+ GiB.*kv_cache=offload or quantized"):
        check_fits(plain, cap_gib, 0)


def test_a_group_size_that_does_not_divide_head_dim_is_refused_before_the_split(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_cfg("kv_cache=quantized", "kv_cache.group_size=24", f"split.dir={tmp_path}")
    with pytest.raises(ValueError, match=r"kv_cache.group_size=24 does not divide the model's head_dim of 32"):
        build_setup(cfg, Path(cfg.paths.outputs), CPU)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="kv_cache.bits"):
        make_cfg("kv_cache=quantized", "kv_cache.bits=3")



def test_a_quantized_cache_logs_its_size_and_its_quality_against_a_plain_one(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("kv_cache=quantized", "kv_cache.bits=2", "kv_cache.residual=4", "quality.enabled=true",
                   "quality.max_tokens=64", "workload.max_new_tokens=4", "probe.enabled=false")
    report = run_job(cfg, {}, choices={"kv_cache": "quantized"}, overrides=[], console=Console(quiet=True))
    assert report.kv_cache_bytes > 0 and report.kv_quality_positions > 0
    assert 0 <= report.kv_quality_top1_agreement <= 1 and report.kv_quality_kl_mean >= 0
    plain = run_job(make_cfg("quality.enabled=true", "quality.max_tokens=64", "workload.max_new_tokens=4",
                             "probe.enabled=false"), {}, choices={}, overrides=[], console=Console(quiet=True))
    assert plain.kv_quality_top1_agreement is None and plain.kv_cache_bytes > report.kv_cache_bytes


def test_the_long_context_preset_runs_each_kv_cache_option(make_cfg: Callable[..., Config]) -> None:
    """The preset's sweep and settings, run small: the tiny model and a 64-token prompt instead of SmolLM2's 2,000."""
    from omegaconf import OmegaConf

    from harness.compose import compose_config, conf_dir

    sweep = OmegaConf.load(Path(conf_dir()) / "experiment" / "long_context.yaml").hydra.sweeper.params
    assert sweep.kv_cache == "none,device,offload,quantized"
    preset = compose_config(["+experiment=long_context"])
    assert preset.model.name == "smollm2-135m" and preset.workload.prompt_tokens == 2000
    small = [f"{key}={OmegaConf.select(preset, key)}" for key in (
        "workload.max_new_tokens", "workload.stop_at_eos", "bench.warmup", "bench.repeats", "quality.enabled")]
    for kv in sweep.kv_cache.split(","):
        cfg = make_cfg(*small, f"kv_cache={kv}", "workload.prompt_tokens=64", "quality.max_tokens=64")
        report = run_job(cfg, {}, choices={"kv_cache": kv}, overrides=[], console=Console(quiet=True))
        assert report.kv_cache_bytes is not None and (report.kv_cache_bytes == 0) == (kv == "none")
        assert (report.kv_quality_top1_agreement is not None) == (kv == "quantized")


@pytest.mark.parametrize(("bits", "residual"), [(8, 128), (4, 128), (4, 3), (2, 5)])
def test_speculative_decoding_crops_rejected_drafts_off_a_quantized_cache(
    make_cfg: Callable[..., Config], bits: int, residual: int
) -> None:
    """float8 positions are quantized one by one, so cutting them leaves the cache a greedy run would hold: the same
    tokens. Grouped integers cut from the residual window likewise; a window that overflows mid-pass is requantized
    (as an overflow in greedy decoding is, at other moments), so those runs are checked to run, not to match."""
    kv = ("kv_cache=quantized", f"kv_cache.bits={bits}", f"kv_cache.residual={residual}", *LONG[1:])
    cfg = make_cfg(*kv, "decoding=speculative", "decoding.k=3", "decoding.draft=tiny-draft")
    gen = generate(build_setup(cfg, Path(cfg.paths.outputs), CPU), cfg)
    assert len(gen.generated_ids) == 20 and gen.metrics["spec_accepted_share"] < 1
    if residual > 20 + 16:  # the whole generation within the window: nothing requantized
        plain = make_cfg(*kv)
        assert gen.generated_ids == generate(build_setup(plain, Path(plain.paths.outputs), CPU), plain).generated_ids
