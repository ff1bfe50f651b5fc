"""cache=disk: read the layer file at every pass, keep nothing (AirLLM's default)."""

from __future__ import annotations

import torch

from strategies.cache.base import LayerFiles
from strategies.cache.configs import DiskCacheConfig
from strategies.cache.files import read_layer_file


class DiskCache:
    def __init__(self, cfg: DiskCacheConfig, files: LayerFiles, device: torch.device) -> None:
        self.cfg = cfg
        self.files = files
        self.bytes_read = 0

    def get(self, name: str) -> dict[str, torch.Tensor]:
        self.bytes_read += self.files.file_bytes(name)
        return read_layer_file(self.files.file(name), self.cfg.page_cache)

    @property
    def bytes_held(self) -> int:
        return 0
