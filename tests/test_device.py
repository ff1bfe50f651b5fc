"""harness.device: the device a run names, and the size of its last-level cache (the stream probe evicts it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.device import last_level_cache_bytes, resolve_device

CPU = torch.device("cpu")


def fake_sysfs(root: Path, caches: list[tuple[str, str]]) -> Path:
    """A cpu0/cache folder as Linux lays it out: one indexN folder per cache, with its level and size."""
    for index, (level, size) in enumerate(caches):
        folder = root / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    return root


def test_the_last_level_cache_is_the_highest_level_sysfs_lists(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, [("1", "32K"), ("1", "32K"), ("2", "1024K"), ("3", "32768K")])
    assert last_level_cache_bytes(CPU, sysfs) == 32 << 20


def test_an_unreadable_cache_entry_is_skipped(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, [("2", "2M"), ("3", "garbage")])
    assert last_level_cache_bytes(CPU, sysfs) == 2 << 20


def test_without_sysfs_the_cache_is_taken_as_larger_than_most(tmp_path: Path) -> None:
    assert last_level_cache_bytes(CPU, tmp_path / "absent") == 64 << 20


def test_asking_for_cuda_without_one_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device=cpu or device=auto"):
        resolve_device("cuda")
