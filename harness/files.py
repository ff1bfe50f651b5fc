"""Files that are either whole or absent: what a crash or a concurrent writer may never leave half-written."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    The temporary name is unique to the process and thread (two writers of one file never share
    it) and is opened like any file, so the result has the umask's mode: a split or a checkpoint
    stays readable by the other users and tools that the outputs folder is shared with (mkstemp
    would make it owner-only). Fsynced before the rename, so a power cut cannot leave the new name
    on empty blocks.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; `on_wait` is called before waiting.

    flock, not the lock file's existence: the kernel drops the lock when its holder exits or is
    killed, so an interrupted run never leaves the folder locked. Opened read-only, because flock
    needs no write access: a user who may only read a shared folder still takes part.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        # A folder we may not write to: this process cannot write there either, so it has nothing
        # to guard; it only reads what a writer finished (every file is renamed into place whole).
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def folder_build_lock(folder: Path, on_wait: Callable[[], None] | None = None) -> AbstractContextManager[None]:
    """The lock of a folder built whole and renamed into place (a generated or converted checkpoint): who holds
    it builds, and who waited finds the folder there. Beside the folder, since the folder is not there yet."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(folder.with_name(f".{folder.name}.lock"), on_wait=on_wait)
