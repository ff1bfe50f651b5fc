"""A split's files predicted from the geometry and the codec alone: each stored tensor's name, shape and dtype,
and each file's size, header included, without writing or reading a weight.

The plan without a run (`plan.only`) sizes the units a pass streams and chooses the resident set from these
predictions. Each codec says what its `encode` stores (`Codec.stored_shapes`, beside the encoding itself); the
file size is safetensors' layout: an 8-byte length, a JSON header padded with spaces to a multiple of 8, then the data.

Exact in bytes, except with double_quant: its record holds a float (the mean absmax) whose printed length depends on
the weights, so such a file may differ by up to DOUBLE_QUANT_SLACK bytes per compressed weight plus the padding.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import torch
from transformers import LlamaConfig

from harness.checkpoints.generated import tensor_specs
from harness.split.layout import unit_names, unit_of

# safetensors' dtype names, in the order its serializer sorts tensors by (larger dtype first, then by name).
ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.int64: "I64"}
ST_ORDER = ["BOOL", "U8", "I8", "F16", "BF16", "I32", "F32", "I64"]
DOUBLE_QUANT_SLACK = 4  # bytes a printed double_quant offset may differ from the codec's stand-in, either way

Spec = tuple[tuple[int, ...], torch.dtype]  # a stored tensor: shape, dtype


def unit_specs(config: LlamaConfig) -> dict[str, dict[str, Spec]]:
    """Each file unit's tensors as the checkpoint holds them (names inside the unit's module), in the model's
    dtype; a tied lm_head has none (it reads embed's file)."""
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    units: dict[str, dict[str, Spec]] = defaultdict(dict)
    for name, shape, _ in tensor_specs(config):
        unit, inner = unit_of(name, config.num_hidden_layers)
        units[unit][inner] = (tuple(shape), dtype)
    return dict(units)


def stored_specs(codec: Any, unit: str, tensors: dict[str, Spec]) -> dict[str, Spec]:
    """What `codec.encode(unit, tensors)` stores, as shapes and dtypes (`Codec.stored_shapes`)."""
    return {key: spec for name, (shape, dtype) in tensors.items()
            for key, spec in codec.stored_shapes(unit, name, shape, dtype).items()}


def data_bytes(stored: dict[str, Spec]) -> int:
    """The stored tensors' bytes: what a unit holds in memory once read (no header)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in stored.values())


def safetensors_bytes(stored: dict[str, Spec], metadata: dict[str, str] | None = None) -> int:
    """The size of the safetensors file `safetensors.torch.save(tensors, metadata)` writes for these tensors."""
    order = sorted(stored, key=lambda n: (-ST_ORDER.index(ST_DTYPES[stored[n][1]]), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        shape, dtype = stored[name]
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text % 8) + offset


def predicted_files(config: LlamaConfig, codec: Any) -> dict[str, dict[str, Any]]:
    """Unit -> the record its split file would get in the manifest (`file`, `bytes`, `tensors`), plus `data_bytes`
    (its tensors in memory); no sha256, since no byte of it exists."""
    files = {}
    for unit, tensors in unit_specs(config).items():
        stored = stored_specs(codec, unit, tensors)
        files[unit] = {
            "file": f"{unit}.safetensors",
            "bytes": safetensors_bytes(stored, {"format": "pt"}),
            "data_bytes": data_bytes(stored),
            "tensors": {n: {"shape": list(s), "dtype": str(d).removeprefix("torch.")} for n, (s, d) in stored.items()},
        }
    return files


def predicted_manifest(config: LlamaConfig, codec: Any) -> dict[str, Any]:
    """The parts of a split's manifest that SplitLayout reads, predicted: the layer count, each file's record, and
    the tied lm_head's alias."""
    files = predicted_files(config, codec)
    order = [u for u in unit_names(config.num_hidden_layers) if u in files]
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "compression": codec.split_key,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "files": {u: files[u] for u in order},
        "aliases": {"lm_head": "embed"} if config.tie_word_embeddings else {},
    }


def predicted_split_bytes(config: LlamaConfig, codec: Any) -> int:
    """The split's files together, as `codec` would store `config`'s model."""
    return sum(r["bytes"] for r in predicted_files(config, codec).values())
