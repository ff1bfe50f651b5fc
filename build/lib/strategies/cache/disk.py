"""cache=disk: read the layer file at every pass, keep nothing past the pass (AirLLM's default)."""

from __future__ import annotations

from pathlib import Path

import torch

from strategies.cache.base import LayerFiles
from strategies.cache.configs import DiskCacheConfig
from strategies.cache.files import read_layer_file


class DiskCache:
    def __init__(self, cfg: DiskCacheConfig, files: LayerFiles, device: torch.device) -> None:
        self.cfg = cfg
        self.files = files
        self.bytes_read = 0
        # A file that several units of a pass read (tied embed and lm_head): held from its first reader
        # to its last, so a pass reads it once. Path -> (tensors, readers still to come).
        self._shared: dict[Path, tuple[dict[str, torch.Tensor], int]] = {}

    def get(self, name: str) -> dict[str, torch.Tensor]:
        path = self.files.file(name)
        if path in self._shared:
            tensors, left = self._shared.pop(path)
            if left > 1:
                self._shared[path] = (tensors, left - 1)
            return tensors
        self.bytes_read += self.files.file_bytes(name)
        tensors = read_layer_file(path, self.cfg.page_cache)
        if (readers := self.files.readers(name)) > 1:
            self._shared[path] = (tensors, readers - 1)
        return tensors

    @property
    def bytes_held(self) -> int:
        """Host bytes kept between passes: none (a shared file is let go by its last reader in the pass)."""
        return 0
