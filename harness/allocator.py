"""How this process's host memory is allocated: freed memory is reused, never mapped afresh.

glibc's malloc serves every allocation over 32 MiB (a 1B layer's MLP weight in bfloat16 is exactly that) with a
fresh mmap and unmaps it on free, so each decoded layer, each pass, pays a page fault for every 4 KiB it writes.
On CPU that is most of a compressed layer's cost, and its price follows the kernel's load, not the code. With
mmap off and the heap never trimmed, freed blocks are reused in place; with one arena, the prefetch worker and
the compute share one heap, so that what one frees the other reuses (two heaps each keep their own, and the peak
grows). Set on importing `harness`, so that jobs, probes, sweep workers and tests all allocate alike; a process
whose environment sets glibc's own malloc settings (USER_SETTINGS) keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc's own settings: a user sets one (MALLOC_MMAP_MAX_=65536 is its default) to measure without reuse.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
# The policy in force, as tagged on runs (`host.malloc`): reuse, environment (the environment sets malloc) or
# unavailable (not glibc).
policy = "unavailable"


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()
# No mmap for big blocks; the heap's top is never given back (up to the most mallopt takes); one arena.
_REUSE = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))


def reuse_freed_memory() -> str:
    """Set glibc's malloc to reuse what it frees (_REUSE), unless the environment sets malloc itself; returns the
    policy now in force."""
    global policy
    if _LIBC is None:
        policy = "unavailable"
    elif any(name in os.environ for name in USER_SETTINGS):
        policy = "environment"
    elif all(_LIBC.mallopt(param, value) for param, value in _REUSE):
        policy = "reuse"
    return policy


def release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (malloc_trim): what a finished job freed no longer counts in
    the next job's resident memory."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
