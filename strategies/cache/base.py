"""cache: where a layer's stored tensors come from on each pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from omegaconf import MISSING


@dataclass
class CacheConfig:
    name: str = MISSING
    _target_: str = MISSING


class LayerCache(Protocol):
    """Host tensors of one layer file, exactly as the split stored them (still encoded)."""

    def get(self, name: str) -> dict[str, torch.Tensor]: ...

    @property
    def bytes_held(self) -> int:
        """Host bytes this cache keeps alive between passes."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage so far (a running total: the pipeline takes differences)."""
        ...
