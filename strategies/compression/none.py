"""compression=none: weights stored as the checkpoint has them; decoding is the host-to-device copy."""

from __future__ import annotations

import torch

from strategies.compression.configs import NoCompressionConfig


class NoCompression:
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # the stored tensors are the weights: nothing extra.
    stored_fraction = 0.0
    lossy = False
    bits = NoCompressionConfig.bits

    def __init__(self, cfg: NoCompressionConfig) -> None:
        self.cfg = cfg

    @property
    def split_key(self) -> str:
        return "none"

    def stores_plain(self, layer: str) -> bool:
        return True

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def stored_shapes(
        self, layer: str, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (shape, dtype)}

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return stored
