"""compression=8bit: bitsandbytes blockwise int8 (dynamic code book, one absmax per block)."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

from harness.checks import check_choice
from strategies.compression.base import CompressionConfig
from strategies.compression.blockwise import BlockwiseCodec, pack_json, unpack_json

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Blockwise8bitConfig(CompressionConfig):
    name: str = "8bit"
    _target_: str = "strategies.compression.blockwise_8bit.Blockwise8bit"
    # 256: one fp32 scale per 256 weights costs 1.6% on top of the int8 codes.
    blocksize: int = 256
    # Embedding and lm_head are gathers / the final projection; compressing them is a separate trade-off.
    compress_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("compression.blocksize", self.blocksize, BLOCKSIZES)


class Blockwise8bit(BlockwiseCodec):
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # int8 codes are half of bf16, plus a scale per block.
    stored_fraction = 0.52

    @property
    def split_key(self) -> str:
        return f"8bit-b{self.cfg.blocksize}" + ("-emb" if self.cfg.compress_embeddings else "")

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, state = bnbf.quantize_blockwise(weight, blocksize=self.cfg.blocksize)
        record = {"dtype": str(weight.dtype).removeprefix("torch."), "blocksize": self.cfg.blocksize}
        return codes, {"absmax": state.absmax, "code": state.code, "meta": pack_json(record)}

    def dequantize(self, codes: torch.Tensor, state: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        meta = unpack_json(state["meta"])
        quant_state = bnbf.QuantState(
            absmax=state["absmax"], code=state["code"], blocksize=meta["blocksize"], dtype=getattr(torch, meta["dtype"])
        )
        return bnbf.dequantize_blockwise(codes, quant_state)
