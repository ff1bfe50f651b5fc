"""compression=none: weights stored as the checkpoint has them; decoding is the host-to-device copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strategies.compression.base import CompressionConfig


@dataclass
class NoCompressionConfig(CompressionConfig):
    name: str = "none"
    _target_: str = "strategies.compression.none.NoCompression"


class NoCompression:
    def __init__(self, cfg: NoCompressionConfig) -> None:
        self.cfg = cfg

    @property
    def split_key(self) -> str:
        return "none"

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        # non_blocking only matters for pinned sources on CUDA; elsewhere it is a plain copy (or none on CPU).
        return {key: t.to(device, non_blocking=True) for key, t in stored.items()}
