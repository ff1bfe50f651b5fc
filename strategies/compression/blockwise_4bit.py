"""compression=4bit: bitsandbytes nf4 (default) or fp4, blockwise, optionally double-quantized scales."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

from harness.checks import check_choice
from strategies.compression.base import CompressionConfig
from strategies.compression.blockwise import BlockwiseCodec

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class Blockwise4bitConfig(CompressionConfig):
    name: str = "4bit"
    _target_: str = "strategies.compression.blockwise_4bit.Blockwise4bit"
    # nf4: levels at normal quantiles, the better fit for normally distributed weights (QLoRA).
    quant_type: str = "nf4"
    # 64 is bitsandbytes' default for 4-bit: an fp32 scale per 64 weights (+12.5% on the codes).
    blocksize: int = 64
    # Quantize the scales themselves to 8 bit (saves ~0.4 bit/weight at a small decode cost).
    double_quant: bool = False
    compress_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("compression.quant_type", self.quant_type, QUANT_TYPES)
        check_choice("compression.blocksize", self.blocksize, BLOCKSIZES)


class Blockwise4bit(BlockwiseCodec):
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # 4-bit codes are a quarter of bf16, plus a scale per block.
    stored_fraction = 0.29

    @property
    def split_key(self) -> str:
        c = self.cfg
        return f"4bit-{c.quant_type}-b{c.blocksize}" + ("-dq" if c.double_quant else "") + (
            "-emb" if c.compress_embeddings else ""
        )

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, state = bnbf.quantize_4bit(
            weight,
            blocksize=self.cfg.blocksize,
            compress_statistics=self.cfg.double_quant,
            quant_type=self.cfg.quant_type,
        )
        # packed=True puts dtype, shape, blocksize and quant type in a uint8 tensor: no pickle needed.
        return codes, state.as_dict(packed=True)

    def dequantize(self, codes: torch.Tensor, state: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return bnbf.dequantize_4bit(codes, bnbf.QuantState.from_dict(state, device))
