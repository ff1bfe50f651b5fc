"""cache: where a layer's stored tensors come from on each pass."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class LayerFiles(Protocol):
    """What a cache needs of a split: each unit's file and its size (a split's layout implements it)."""

    def file(self, unit: str) -> Path: ...

    def file_bytes(self, unit: str) -> int: ...

    def readers(self, unit: str) -> int:
        """How many units of a pass read this unit's file (2 for tied embeddings: embed and lm_head)."""
        ...


class LayerCache(Protocol):
    """Host tensors of one layer file, exactly as the split stored them (still encoded)."""

    # True: every pass reads each unit's file again (the bytes a pass moves over the disk link).
    rereads: bool
    files: LayerFiles

    def get(self, name: str) -> dict[str, torch.Tensor]: ...

    def lookup_table(self, name: str) -> dict[str, torch.Tensor]:
        """`name`'s tensors for a pass that reads only a few rows of them (the embedding lookup), read no further
        than the lookup touches: a rereading cache maps the file and reads nothing ahead."""
        ...

    @property
    def bytes_held(self) -> int:
        """Host bytes this cache keeps alive between passes."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage so far (a running total: the pipeline takes differences)."""
        ...
