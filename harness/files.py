"""Files that are either whole or absent: what a crash or a concurrent writer may never leave half-written."""

from __future__ import annotations

import os
import threading
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
