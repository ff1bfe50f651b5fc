"""A commit of layerbench checked out apart, and a job run from it: what `harness.ab --a-rev/--b-rev` compares.

Each revision is a git worktree of this repository in a folder of its own; a job runs there as
`python -m harness ...` with that folder first on the import path, so its harness/, strategies/ and conf/ are the
revision's while the installed libraries (torch, transformers, ...) are this environment's. The job's MLflow run
is found afterwards as the one run that appeared in the experiment, and read back from the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# This checkout: the repository whose history the revisions come from.
ROOT = Path(__file__).resolve().parents[1]


class CheckoutError(RuntimeError):
    """A revision that cannot be checked out, or a job that failed there; the message says which and why."""


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckoutError(done.stderr.strip() or f"git {' '.join(args)} exited {done.returncode}")
    return done.stdout.strip()


def resolve(rev: str) -> str:
    """The full commit id `rev` names in this repository; CheckoutError naming it when it names none."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except CheckoutError:
        raise CheckoutError(f"{rev!r} names no commit of {ROOT}: give a commit id, tag or branch") from None


@contextmanager
def checkouts(commits: list[str]) -> Iterator[dict[str, Path]]:
    """Each commit checked out as a detached worktree in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="layerbench-rev-") as tmp:
        folders: dict[str, Path] = {}
        try:
            for commit in dict.fromkeys(commits):
                folders[commit] = Path(tmp) / commit[:12]
                _git("worktree", "add", "--detach", str(folders[commit]), commit)
            yield folders
        finally:
            for folder in folders.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                               capture_output=True)


def run_job_in(folder: Path, overrides: list[str]) -> None:
    """`python -m harness OVERRIDES` with `folder`'s code; CheckoutError with the end of its output if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "harness", *overrides], cwd=folder, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckoutError(f"the job in {folder} exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
