"""How host memory is allocated while a job runs (`bench.host_malloc`): reuse, or glibc's defaults.

glibc's malloc serves every allocation over 32 MiB (a 1B layer's MLP weight in bfloat16 is exactly that) with a
fresh mmap and unmaps it on free, so each decoded layer, each pass, pays a page fault for every 4 KiB it writes,
at whatever the kernel charges for one at the time. `reuse` turns mmap and heap trimming off, so freed blocks are
reused in place. The heap keeps what it grows to (its free pages are handed back, its address space is not), so
the policy holds for a job and is undone after.

Every thread allocates from one arena, whatever the policy (`one_arena`, at import), so the prefetch worker
decodes into the heap the compute frees into, as it does in every process. glibc fixes its arena limit the first
time a thread needs an arena: an arena made before (by a library's thread started at its import, as MLflow's
pyarrow does in a sweep) is handed to a later thread in turn, and the stream probe's passes changed with it
(docs/findings.md). So it is set before any other import.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# bench.host_malloc's options.
POLICIES = ("reuse", "glibc")
# No mmap for big blocks; the heap's top never given back (up to the most mallopt takes).
_REUSE = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
# glibc's defaults (mallopt(3)), but for the arenas (one_arena).
_GLIBC = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def one_arena() -> None:
    """Every thread of this process allocates from the main arena: glibc fixes its arena limit the first time a
    thread needs one, so this holds for the process once set before any thread has allocated."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, 1)


# The policy in force: what the probes measured under goes into their cache's key.
current = "glibc"


@contextlib.contextmanager
def host_malloc(policy: str) -> Iterator[None]:
    """Allocate by `policy` inside the block; after it, free pages go back to the kernel and the policy before
    returns. Without glibc (another libc), nothing changes."""
    if policy not in POLICIES:
        raise ValueError(f"bench.host_malloc={policy!r} is not one of {', '.join(POLICIES)}")
    before = current
    if _LIBC is None or before == policy:
        yield
        return
    _set(policy)
    try:
        yield
    finally:
        release_free_memory()
        _set(before)


def _set(policy: str) -> None:
    global current
    for param, value in _REUSE if policy == "reuse" else _GLIBC:
        _LIBC.mallopt(param, value)  # type: ignore[union-attr]
    current = policy


def release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (malloc_trim): what a finished job freed no longer counts in
    the next job's resident memory."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
