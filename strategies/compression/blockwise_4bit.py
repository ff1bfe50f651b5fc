"""compression=4bit: bitsandbytes nf4 (default) or fp4, blockwise, optionally double-quantized scales."""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.utils import unpack_tensor_to_dict

from strategies.compression.blockwise import BlockwiseCodec, Shape, json_bytes
from strategies.compression.configs import Blockwise4bitConfig

# A stand-in for the mean absmax that double_quant's record prints, at a typical length (17 significant digits):
# the real one depends on the weights, so a predicted record may be off by a few bytes.
OFFSET_STAND_IN = 0.026458796486258507


class Blockwise4bit(BlockwiseCodec):
    cfg: Blockwise4bitConfig
    # Device bytes of the stored form per decoded byte, both alive while a layer decodes:
    # 4-bit codes are a quarter of bf16, plus a scale per block.
    stored_fraction = 0.29
    bits = Blockwise4bitConfig.bits

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

    def quantized_shapes(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Shape]:
        c = self.cfg
        n = math.prod(shape)
        blocks = -(-n // c.blocksize)
        # bitsandbytes' packed record (`as_dict(packed=True)`): json.dumps of these fields.
        record: dict[str, Any] = {"quant_type": c.quant_type, "blocksize": c.blocksize,
                                  "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
        parts: dict[str, Shape] = {"q": (((n + 1) // 2, 1), torch.uint8), "quant_map": ((16,), torch.float32)}
        if c.double_quant:
            parts["absmax"] = ((blocks,), torch.uint8)
            parts["nested_absmax"] = ((-(-blocks // 256),), torch.float32)
            parts["nested_quant_map"] = ((256,), torch.float32)
            record.update(nested_blocksize=256, nested_dtype="float32", nested_offset=OFFSET_STAND_IN)
        else:
            parts["absmax"] = ((blocks,), torch.float32)
        parts[f"quant_state.bitsandbytes__{c.quant_type}"] = ((json_bytes(record),), torch.uint8)
        return parts

    def read_record(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        # bitsandbytes' packed record: the one `quant_state.bitsandbytes__<type>` entry `as_dict(packed=True)` wrote.
        record = unpack_tensor_to_dict(next(t for key, t in state.items() if key.startswith("quant_state.")))
        nested = None
        if "nested_blocksize" in record:
            nested = {"blocksize": record["nested_blocksize"], "dtype": getattr(torch, record["nested_dtype"])}
        fields = {
            "shape": torch.Size(record["shape"]),
            "blocksize": record["blocksize"],
            "quant_type": record["quant_type"],
            "dtype": getattr(torch, record["dtype"]),
            # A float, where QuantState.from_dict makes a device tensor of it: a host-to-device copy that waits.
            "offset": record.get("nested_offset"),
        }
        return {"fields": fields, "nested": nested}

    def dequantize(self, codes: torch.Tensor, state: dict[str, torch.Tensor], record: dict[str, Any]) -> torch.Tensor:
        # QuantState.from_dict's result, built from the kept record and the device tensors alone.
        nested = record["nested"]
        state2 = None if nested is None else bnbf.QuantState(
            absmax=state["nested_absmax"], code=state["nested_quant_map"], **nested
        )
        fields = record["fields"]
        return bnbf.dequantize_4bit(
            codes, bnbf.QuantState(absmax=state["absmax"], code=state["quant_map"], state2=state2, **fields)
        )
