"""compression=4bit: bitsandbytes nf4 (default) or fp4, blockwise, optionally double-quantized scales."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from strategies.compression.blockwise import BlockwiseCodec
from strategies.compression.configs import Blockwise4bitConfig


class Blockwise4bit(BlockwiseCodec):
    cfg: Blockwise4bitConfig
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # 4-bit codes are a quarter of bf16, plus a scale per block.
    stored_fraction = 0.29
    dequant_link = "4bit"

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
