"""compression: how layer weights are encoded at split time and decoded on the device."""

from __future__ import annotations

from typing import Protocol

import torch


class Codec(Protocol):
    # Device bytes of a layer's stored form per byte of its decoded weights (0 when they are the same tensors).
    stored_fraction: float
    # Whether decoding gives back other weights than the checkpoint's: then the job measures what it costs.
    lossy: bool
    # Bits a stored weight takes, which picks the link probe's dequant rate; None when decoding is free.
    bits: int | None

    @property
    def split_key(self) -> str:
        """Names the split directory: two codecs with the same key write identical files."""
        ...

    def stores_plain(self, layer: str) -> bool:
        """Whether `layer` is stored as its weights are (decode hands the stored tensors back untouched)."""
        ...

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Split time: a layer's checkpoint tensors -> the tensors stored in its file."""
        ...

    def stored_shapes(
        self, layer: str, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What `encode` stores for one checkpoint tensor, as names, shapes and dtypes, without a weight: a split's
        files predicted before it exists (plan.only)."""
        ...

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Load time: stored tensors, already copied to `device` -> the layer's weights there."""
        ...
