"""compression=8bit: bitsandbytes blockwise int8 (dynamic code book, one absmax per block)."""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes.functional as bnbf
import torch

from strategies.compression.blockwise import BlockwiseCodec, Shape, json_bytes, pack_json, unpack_json
from strategies.compression.configs import Blockwise8bitConfig


class Blockwise8bit(BlockwiseCodec):
    cfg: Blockwise8bitConfig
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # int8 codes are half of bf16, plus a scale per block.
    stored_fraction = 0.52
    bits = Blockwise8bitConfig.bits

    @property
    def split_key(self) -> str:
        return f"8bit-b{self.cfg.blocksize}" + ("-emb" if self.cfg.compress_embeddings else "")

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, state = bnbf.quantize_blockwise(weight, blocksize=self.cfg.blocksize)
        record = {"dtype": str(weight.dtype).removeprefix("torch."), "blocksize": self.cfg.blocksize}
        return codes, {"absmax": state.absmax, "code": state.code, "meta": pack_json(record)}

    def quantized_shapes(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Shape]:
        meta = {"dtype": str(dtype).removeprefix("torch."), "blocksize": self.cfg.blocksize}
        return {
            "q": (shape, torch.uint8),
            "absmax": ((-(-math.prod(shape) // self.cfg.blocksize),), torch.float32),
            "code": ((256,), torch.float32),
            "meta": ((json_bytes(meta, sort_keys=True),), torch.uint8),  # pack_json's sorted record
        }

    def read_record(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        meta = unpack_json(state["meta"])
        return {"blocksize": meta["blocksize"], "dtype": getattr(torch, meta["dtype"])}

    def dequantize(self, codes: torch.Tensor, state: dict[str, torch.Tensor], record: dict[str, Any]) -> torch.Tensor:
        quant_state = bnbf.QuantState(absmax=state["absmax"], code=state["code"], **record)
        return bnbf.dequantize_blockwise(codes, quant_state)
