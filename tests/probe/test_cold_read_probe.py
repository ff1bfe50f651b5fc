"""harness.probe.reads: the cold read probe times the run's own cache reading a file of the asked size from a
cold page cache (dropped before each read), keeps the median, leaves no file behind and refuses a cache or page
cache it cannot time; harness.probe.store caches it per cache config and size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import strategies.cache.disk as disk_cache
from harness.probe import links, reads, store
from strategies.cache.configs import DiskCacheConfig, RamCacheConfig

CPU = torch.device("cpu")
COLD = DiskCacheConfig(page_cache="cold")


def test_each_timed_read_is_the_disk_caches_from_a_dropped_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped: list[Path] = []
    original = disk_cache.read_layer_file

    def spy(path: Path, cold: bool, **kwargs: object) -> dict[str, torch.Tensor]:
        assert cold, "the cache reads the file cold"
        dropped.append(path)
        tensors = original(path, cold, **kwargs)
        assert sum(t.nbytes for t in tensors.values()) >= 100_000 - 128, "the whole file is read"
        return tensors

    monkeypatch.setattr(disk_cache, "read_layer_file", spy)
    seconds = reads.measure_cold_read_s(COLD, CPU, 100_000, tmp_path, repeats=3)
    assert seconds > 0
    assert len(dropped) == 4, "one untimed read, then the three timed"
    assert list(tmp_path.iterdir()) == [], "the scratch file and its folder are removed"


def test_the_median_read_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 9.0, 0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # the untimed read, then reads of 1, 3 and 2 s

    monkeypatch.setattr(links, "perf_counter", lambda: next(clock))
    assert reads.measure_cold_read_s(COLD, CPU, 4096, tmp_path, repeats=3) == 2.0


@pytest.mark.parametrize(
    ("cache", "error"),
    [(DiskCacheConfig(), "page_cache=cold, not 'warm'"), (RamCacheConfig(page_cache="cold"), "reads each file once")],
    ids=["warm", "read-once"],
)
def test_a_cache_it_cannot_time_cold_is_refused(tmp_path: Path, cache: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        reads.measure_cold_read_s(cache, CPU, 4096, tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("read-*/*")), "nothing left behind"


def test_a_killed_probes_scratch_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{reads.SCRATCH_PREFIX}-{dead.stdout.strip()}-x"
    orphan.mkdir()
    (orphan / "file.safetensors").write_bytes(b"half written")
    alive = tmp_path / f"{reads.SCRATCH_PREFIX}-{os.getpid()}-y"
    alive.mkdir()
    reads.measure_cold_read_s(COLD, CPU, 4096, tmp_path, repeats=1)
    assert not orphan.exists(), "a dead process's folder is removed"
    assert alive.exists(), "a running process's is not"


def test_a_cold_read_is_cached_per_cache_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, int]] = []

    def measure(cache: object, device: object, size_bytes: int, scratch_dir: Path) -> float:
        calls.append((cache, size_bytes))
        return 0.001 * len(calls)

    monkeypatch.setattr(store, "measure_cold_read_s", measure)
    first = store.load_or_measure_cold_read_s(COLD, CPU, 4096, tmp_path)
    assert store.load_or_measure_cold_read_s(COLD, CPU, 4096, tmp_path) == first and len(calls) == 1
    assert store.load_or_measure_cold_read_s(COLD, CPU, 8192, tmp_path) != first and len(calls) == 2
    store.load_or_measure_cold_read_s(DiskCacheConfig(), CPU, 4096, tmp_path)
    assert len(calls) == 3, "another cache's read is another measurement"
    assert store.load_or_measure_cold_read_s(COLD, CPU, 4096, tmp_path, refresh=True) != first
    assert len(calls) == 4
    assert store.mark_stale(CPU, tmp_path, "a run beat its floor") == [], "the floor's probes only"
