"""harness.allocator: with bench.host_malloc=reuse, a layer's worth of memory allocated, written and freed each pass
faults its pages in once, not every pass as under glibc's defaults; glibc's defaults return after the job; the
probes cache what they measured under each policy apart; and every thread shares one arena from the moment
harness is imported. Counted in page faults and arenas, not seconds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harness import allocator
from harness.config import Config
from harness.probe import store

ROOT = Path(__file__).resolve().parents[1]
# A pass as a decode makes one: stored bytes widened, then decoded (blocks over glibc's 32 MiB mmap threshold), all
# freed at the end. Prints the faults of ten passes after three: under reuse, then after it (glibc's defaults back).
PASSES = """
import resource
from harness.allocator import host_malloc
import torch
def one_pass():
    stored = torch.ones(24 << 20, dtype=torch.uint8)
    wide = stored.to(torch.int16) * 3
    decoded = wide.to(torch.bfloat16) + 1
    return float(decoded[-1])
def faults():
    for _ in range(3):
        one_pass()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_pass()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
with host_malloc("reuse"):
    reused = faults()
print(reused, faults())
"""


@pytest.mark.skipif(allocator._LIBC is None, reason="glibc's malloc only")
def test_a_pass_reuses_what_the_last_freed_and_glibcs_defaults_return_after() -> None:
    out = subprocess.run([sys.executable, "-c", PASSES], env={"PYTHONPATH": str(ROOT), "PATH": ""},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    reused, after = int(out[0]), int(out[1])
    # A pass writes about 200 MiB: under glibc's defaults each pass faults most of its pages in again.
    assert after > 100_000, "glibc's defaults map a big block afresh each time"
    assert reused < after / 5, "a pass faulted its blocks in again"


# Threads that allocate (as a library's threads do at its import, and the prefetch worker later), under each
# policy; malloc_stats then prints one "Arena N:" block per arena to stderr.
THREADS = """
import ctypes
import threading
import harness
from harness.allocator import host_malloc
def allocate():
    [bytearray(1 << 20) for _ in range(4)]
def in_threads():
    for thread in [threading.Thread(target=allocate) for _ in range(3)]:
        thread.start()
        thread.join()
in_threads()
for policy in ("reuse", "glibc"):
    with host_malloc(policy):
        in_threads()
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.skipif(allocator._LIBC is None, reason="glibc's malloc only")
def test_every_thread_allocates_from_one_arena_once_harness_is_imported() -> None:
    err = subprocess.run([sys.executable, "-c", THREADS], env={"PYTHONPATH": str(ROOT), "PATH": ""},
                         capture_output=True, text=True, timeout=120, check=True).stderr
    arenas = [line for line in err.splitlines() if line.startswith("Arena ")]
    assert arenas == ["Arena 0:"], "a thread was given an arena of its own"


def test_a_policy_holds_for_its_block_and_names_the_probes_cache(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    plain = store.cache_path(cpu, tmp_path).name
    with allocator.host_malloc("reuse"):
        assert allocator.current == ("reuse" if allocator._LIBC is not None else "glibc")
        reused = store.cache_path(cpu, tmp_path).name
        with allocator.host_malloc("glibc"):  # untimed work inside a job: glibc's defaults, then reuse again
            assert allocator.current == "glibc"
        assert allocator.current == ("reuse" if allocator._LIBC is not None else "glibc")
    assert allocator.current == "glibc"
    if allocator._LIBC is not None:
        assert reused != plain and "malloc_reuse" in reused, "measured under another policy, cached apart"


def test_an_unknown_policy_is_refused(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ValueError, match=r"bench.host_malloc='arena' is not valid: choose one of reuse, glibc"):
        make_cfg("bench.host_malloc=arena")


def test_writing_a_checkpoint_inside_a_reuse_job_uses_glibcs_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Untimed writing (a generated checkpoint, a split) hands its blocks back: the job's reuse pauses for it."""
    from harness.checkpoints import generated
    from harness.config import ModelConfig

    seen: list[str] = []
    monkeypatch.setattr(generated, "_build", lambda model, out_dir: seen.append(allocator.current))
    with allocator.host_malloc("reuse"):
        generated.ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny"), tmp_path)
        assert allocator.current == ("reuse" if allocator._LIBC is not None else "glibc")
    assert seen == ["glibc"]
