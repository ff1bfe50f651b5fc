"""harness.allocator: importing harness makes glibc's malloc reuse freed blocks, so that a layer's worth of memory
allocated, written and freed each pass faults its pages in once, not every pass; a process whose environment sets
malloc itself keeps its own settings, and runs are tagged with the policy. Counted in page faults, not seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import allocator

ROOT = Path(__file__).resolve().parents[1]
# A pass as a decode makes one: stored bytes widened, then decoded (blocks over glibc's 32 MiB mmap threshold), all
# freed at the end; the faults of ten passes after three.
PASSES = """
import resource
from harness.allocator import policy
import torch
def one_pass():
    stored = torch.ones(24 << 20, dtype=torch.uint8)
    wide = stored.to(torch.int16) * 3
    decoded = wide.to(torch.bfloat16) + 1
    return float(decoded[-1])
for _ in range(3):
    one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_pass()
print(policy, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_ten_passes(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PASSES], env={**clean, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(allocator.policy == "unavailable", reason="glibc's malloc only")
def test_a_pass_reuses_what_the_last_freed_where_glibcs_defaults_fault_it_in_again() -> None:
    policy, faults = faults_of_ten_passes()
    default_policy, default_faults = faults_of_ten_passes(MALLOC_MMAP_MAX_="65536")  # glibc's own default
    assert (policy, default_policy) == ("reuse", "environment"), "settings in the environment are kept"
    # A pass writes about 200 MiB: under glibc's defaults each pass faults most of its pages in again.
    assert default_faults > 100_000
    assert faults < default_faults / 20


def test_runs_are_tagged_with_the_policy() -> None:
    from harness.measurement.environment import environment_tags

    assert environment_tags()["host.malloc"] == allocator.policy
