"""compression=8bit: bitsandbytes blockwise int8 (dynamic code book, one absmax per block)."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

from harness.checks import check_choice
from strategies.compression.base import CompressionConfig
from strategies.compression.blockwise import CODES, STATE, group_stored, pack_json, should_compress, unpack_json

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


class Blockwise8bit:
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # int8 codes are half of bf16, plus a scale per block.
    stored_fraction = 0.52

    def __init__(self, cfg: Blockwise8bitConfig) -> None:
        self.cfg = cfg

    @property
    def split_key(self) -> str:
        return f"8bit-b{self.cfg.blocksize}" + ("-emb" if self.cfg.compress_embeddings else "")

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stored = {}
        for name, t in tensors.items():
            if not should_compress(layer, name, t, self.cfg.compress_embeddings):
                stored[name] = t
                continue
            codes, state = bnbf.quantize_blockwise(t.contiguous(), blocksize=self.cfg.blocksize)
            stored[name + CODES] = codes
            stored[name + STATE + "absmax"] = state.absmax
            stored[name + STATE + "code"] = state.code
            stored[name + STATE + "meta"] = pack_json(
                {"dtype": str(t.dtype).removeprefix("torch."), "blocksize": self.cfg.blocksize}
            )
        return stored

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        plain, compressed = group_stored(stored)
        weights = dict(plain)
        for name, parts in compressed.items():
            meta = unpack_json(parts["meta"])
            state = bnbf.QuantState(
                absmax=parts["absmax"],
                code=parts["code"],
                blocksize=meta["blocksize"],
                dtype=getattr(torch, meta["dtype"]),
            )
            weights[name] = bnbf.dequantize_blockwise(parts["q"], state)
        return weights
