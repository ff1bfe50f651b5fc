"""cache=ram: read each layer file once, keep host copies for later passes.

On CUDA the copies are pinned, so host-to-device transfers can run at full link speed
and asynchronously; elsewhere pinning means nothing and is skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from strategies.cache.base import LayerFiles
from strategies.cache.configs import RamCacheConfig
from strategies.cache.files import read_layer_file


class RamCache:
    rereads = False

    def __init__(self, cfg: RamCacheConfig, files: LayerFiles, device: torch.device) -> None:
        self.cfg = cfg
        self.files = files
        self.pin = device.type == "cuda"
        self.bytes_read = 0
        # Keyed by file, not unit: tied lm_head and embed share one file and one copy.
        self._held: dict[Path, dict[str, torch.Tensor]] = {}

    def get(self, name: str) -> dict[str, torch.Tensor]:
        path = self.files.file(name)
        tensors = self._held.get(path)
        if tensors is None:
            tensors = read_layer_file(path, cold=self.cfg.cold, pin=self.pin)
            self.bytes_read += self.files.file_bytes(name)
            self._held[path] = tensors
        return tensors

    def lookup_table(self, name: str) -> dict[str, torch.Tensor]:
        return self.get(name)  # read once whole anyway: its later passes look up in the held copy

    @property
    def bytes_held(self) -> int:
        return sum(t.nbytes for tensors in self._held.values() for t in tensors.values())
