"""Caches on the CPU: layers computed straight from the mapped split files, every page read in the read stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import strategies.cache.files as files_mod
from harness.job.streamer import build_streamer, generate
from strategies.cache.files import read_layer_file


def _file_mappings() -> list[tuple[int, int, str]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, fields[5]))
    return out


def test_a_layer_is_read_without_a_copy(make_cfg) -> None:
    cfg = make_cfg()
    layout = build_streamer(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    path = layout.file("layers.00")
    tensors = read_layer_file(path, "warm")
    mappings = _file_mappings()
    for name, t in tensors.items():
        owners = [file for lo, hi, file in mappings if lo <= t.data_ptr() < hi]
        assert owners == [str(path)], f"{name} is not a view of {path.name}'s mapping"


def test_touching_pages_is_the_fallback_and_reads_the_same(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg()
    layout = build_streamer(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
    populated = read_layer_file(layout.file("layers.01"), "cold")
    monkeypatch.setattr(files_mod._populate, "works", False)
    touched = read_layer_file(layout.file("layers.01"), "cold")
    assert populated.keys() == touched.keys() and all(torch.equal(populated[k], touched[k]) for k in populated)


@pytest.mark.parametrize("cache", ["disk", "ram"])
def test_tied_embeddings_are_read_once_per_pass(make_cfg, cache: str) -> None:
    cfg = make_cfg(f"cache={cache}", "+model.config_overrides.tie_word_embeddings=true", "workload.max_new_tokens=3")
    streamer = build_streamer(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    layout = streamer.layout
    assert layout.readers("lm_head") == layout.readers("embed") == 2 and layout.readers("norm") == 1
    every_file_once = sum(layout.file_bytes(u) for u in layout.units if u != "lm_head")
    cache_impl = streamer.pipeline.cache
    before = cache_impl.bytes_read
    generate(streamer, cfg)
    first_pass = every_file_once
    later_passes = every_file_once if cache == "disk" else 0
    assert cache_impl.bytes_read - before == first_pass + 2 * later_passes
    # The tensors, without each file's header; the shared file once.
    held = cache_impl.bytes_held
    assert held == 0 if cache == "disk" else every_file_once - 1024 * len(layout.units) < held < every_file_once


def test_a_cold_disk_run_is_held_against_a_plain_read_of_its_files(make_cfg) -> None:
    from harness.job.run import run_job

    cfg = make_cfg("cache=disk", "cache.page_cache=cold", "workload.max_new_tokens=3")
    report = run_job(cfg, {}, choices={"cache": "disk"}, overrides=[])
    assert report.plain_read_bytes_per_s > 0 and report.read_bandwidth_bytes_per_s > 0
    assert report.read_efficiency == pytest.approx(report.read_bandwidth_bytes_per_s / report.plain_read_bytes_per_s)
    # The disk floor of a cold run: its bytes at the plain read rate of its own files.
    assert report.floor_disk_s == pytest.approx(report.read_bytes_per_pass / report.plain_read_bytes_per_s)
    warm_ram = make_cfg("cache=ram", "workload.max_new_tokens=3", "bench.warmup=1")
    ram = run_job(warm_ram, {}, choices={"cache": "ram"}, overrides=[])
    assert ram.read_efficiency is None, "after its warm-up cache=ram reads nothing: no figure, not 0"
    warm = run_job(make_cfg("cache=disk", "workload.max_new_tokens=3"), {}, choices={"cache": "disk"}, overrides=[])
    assert warm.read_efficiency is None, "a warm run is not read against storage twice"
