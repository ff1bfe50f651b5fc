"""cache=ram: read each layer file once, keep host copies for later passes.

On CUDA the copies are pinned, so host-to-device transfers can run at full link speed
and asynchronously; elsewhere pinning means nothing and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.split import SplitLayout
from strategies.cache.base import CacheConfig, read_layer_file


@dataclass
class RamCacheConfig(CacheConfig):
    name: str = "ram"
    _target_: str = "strategies.cache.ram.RamCache"


class RamCache:
    def __init__(self, cfg: RamCacheConfig, layout: SplitLayout, device: torch.device) -> None:
        self.cfg = cfg
        self.layout = layout
        self.pin = device.type == "cuda"
        self.bytes_read = 0
        # Keyed by file, not unit: tied lm_head and embed share one file and one copy.
        self._held: dict[Path, dict[str, torch.Tensor]] = {}

    def get(self, name: str) -> dict[str, torch.Tensor]:
        path = self.layout.file(name)
        tensors = self._held.get(path)
        if tensors is None:
            tensors = read_layer_file(path, self.cfg.page_cache, pin=self.pin)
            self.bytes_read += self.layout.file_bytes(name)
            self._held[path] = tensors
        return tensors

    @property
    def bytes_held(self) -> int:
        return sum(t.nbytes for tensors in self._held.values() for t in tensors.values())
