"""What the bitsandbytes codecs share: which tensors they compress, and the stored-key layout.

A compressed weight `W` (e.g. ``self_attn.q_proj.weight``) is stored as ``W.q`` (the codes)
plus ``W.qs.<field>`` (every field needed to decode it: scales, code book, and a small
JSON record of dtype, shape and block size), so a layer file decodes on its own.
"""

from __future__ import annotations

import json
from typing import Any

import torch

LINEAR_SUFFIXES = ("_proj.weight",)  # q/k/v/o and gate/up/down: the decoder layer's Linear weights
CODES = ".q"
STATE = ".qs."


EMBEDDINGS = ("embed", "lm_head")
Shape = tuple[tuple[int, ...], torch.dtype]  # a stored tensor, predicted: its shape and dtype


def json_bytes(record: dict[str, Any], **dumps: Any) -> int:
    """The length of a JSON record packed into a uint8 tensor, as `json.dumps(record, **dumps)` writes it."""
    return len(json.dumps(record, **dumps).encode())


def should_compress(layer: str, tensor_name: str, tensor: torch.Tensor, compress_embeddings: bool) -> bool:
    if layer in EMBEDDINGS:
        return compress_embeddings
    # Norm weights are a few KB and sensitive: they stay as stored.
    return tensor.dim() == 2 and tensor_name.endswith(LINEAR_SUFFIXES)


def pack_json(record: dict) -> torch.Tensor:
    """A JSON record as a uint8 tensor: safetensors stores tensors only, and no pickle is allowed."""
    return torch.frombuffer(bytearray(json.dumps(record, sort_keys=True).encode()), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.cpu().numpy()).decode())


def group_stored(stored: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split a layer file's tensors into plain ones and compressed ones ({weight: {"q": .., field: ..}})."""
    plain: dict[str, torch.Tensor] = {}
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in stored.items():
        if key.endswith(CODES):
            compressed.setdefault(key.removesuffix(CODES), {})["q"] = t
        elif STATE in key:
            weight, _, field = key.partition(STATE)
            compressed.setdefault(weight, {})[field] = t
        else:
            plain[key] = t
    return plain, compressed


class BlockwiseCodec:
    """The encode/decode walk over a layer that both bitsandbytes codecs share.

    Subclasses say how one weight is quantized (codes plus named state tensors), how its record (the
    non-tensor part of its state: dtype, shape, block size) is read, and how it is dequantized.

    A codec decodes one split: each weight's record is read once, at its first decode, and kept by
    (unit, weight). Reading it is the only host read of the stored bytes, and on CUDA a blocking
    device-to-host copy: read once per weight and pass, it would make the prefetch worker wait for each
    layer's copy and every dequantize before it, serialising copies and decodes.
    """

    cfg: Any  # a config with `compress_embeddings`
    lossy = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._records: dict[tuple[str, str], dict[str, Any]] = {}

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def read_record(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A weight's record, from its stored state (a host read: the record is a tensor in the file)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, state: dict[str, torch.Tensor], record: dict[str, Any]) -> torch.Tensor:
        """The weight on `codes`' device, issued there without waiting for it (no host read)."""
        raise NotImplementedError

    def quantized_shapes(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Shape]:
        """What `quantize` returns for a weight of `shape`: the codes (as "q") and each state field."""
        raise NotImplementedError

    def stored_shapes(self, layer: str, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Shape]:
        weightless = torch.empty(shape, dtype=dtype, device="meta")  # for the same test as `encode`'s
        if not should_compress(layer, name, weightless, self.cfg.compress_embeddings):
            return {name: (shape, dtype)}
        parts = self.quantized_shapes(shape, dtype)
        codes = parts.pop("q")
        return {name + CODES: codes, **{name + STATE + field: spec for field, spec in parts.items()}}

    def stores_plain(self, layer: str) -> bool:
        # A decoder layer's norms stay plain, its Linear weights do not.
        return layer in EMBEDDINGS and not self.cfg.compress_embeddings

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stored = {}
        for name, t in tensors.items():
            if should_compress(layer, name, t, self.cfg.compress_embeddings):
                codes, state = self.quantize(t.contiguous())
                stored[name + CODES] = codes
                stored.update({name + STATE + field: value for field, value in state.items()})
            else:
                stored[name] = t
        return stored

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        plain, compressed = group_stored(stored)
        weights = dict(plain)
        for name, parts in compressed.items():
            codes = parts.pop("q")
            record = self._records.get((layer, name))
            if record is None:
                record = self._records[(layer, name)] = self.read_record(parts)
            weights[name] = self.dequantize(codes, parts, record)
        return weights
