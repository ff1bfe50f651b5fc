"""cache=disk: read the layer file at every pass, keep nothing (AirLLM's default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.split import SplitLayout
from strategies.cache.base import CacheConfig, read_layer_file


@dataclass
class DiskCacheConfig(CacheConfig):
    name: str = "disk"
    _target_: str = "strategies.cache.disk.DiskCache"


class DiskCache:
    def __init__(self, cfg: DiskCacheConfig, layout: SplitLayout, device: torch.device) -> None:
        self.cfg = cfg
        self.layout = layout
        self.bytes_read = 0

    def get(self, name: str) -> dict[str, torch.Tensor]:
        self.bytes_read += self.layout.file_bytes(name)
        return read_layer_file(self.layout.file(name), self.cfg.page_cache)

    @property
    def bytes_held(self) -> int:
        return 0
