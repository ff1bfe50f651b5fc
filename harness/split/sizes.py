"""A split's files predicted from the geometry and the codec alone: each stored tensor's name, shape and dtype,
and each file's size, header included, without writing or reading a weight.

The plan without a run (`plan.only`) sizes the units a pass streams and chooses the resident set from these
predictions. The rules follow what each codec's `encode` stores (strategies/compression/): plain weights as they
are; bitsandbytes' blockwise int8 as codes, one fp32 absmax per block, its 256-entry code book and a small JSON
record; its 4-bit codes packed two to a byte, with absmax per block, the 16-entry code book and its packed JSON
record (and with double_quant, the absmax quantized to 8 bit with their own absmax and code book). The file size
is safetensors' layout: an 8-byte length, a JSON header padded with spaces to a multiple of 8, then the data.

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
# A stand-in for the mean absmax that double_quant's record prints, at a typical length (17 significant digits).
OFFSET_STAND_IN = 0.026458796486258507
DOUBLE_QUANT_SLACK = 4  # bytes a printed offset may differ from the stand-in's length, either way

Spec = tuple[tuple[int, ...], torch.dtype]  # a stored tensor: shape, dtype


def _packed_json_len(record: dict[str, Any], **dumps: Any) -> int:
    return len(json.dumps(record, **dumps).encode())


def _stored_4bit(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg: Any) -> dict[str, Spec]:
    n = math.prod(shape)
    blocks = -(-n // cfg.blocksize)
    record: dict[str, Any] = {"quant_type": cfg.quant_type, "blocksize": cfg.blocksize,
                              "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
    state: dict[str, Spec] = {"quant_map": ((16,), torch.float32)}
    if cfg.double_quant:
        state["absmax"] = ((blocks,), torch.uint8)
        state["nested_absmax"] = ((-(-blocks // 256),), torch.float32)
        state["nested_quant_map"] = ((256,), torch.float32)
        record.update(nested_blocksize=256, nested_dtype="float32", nested_offset=OFFSET_STAND_IN)
    else:
        state["absmax"] = ((blocks,), torch.float32)
    state[f"quant_state.bitsandbytes__{cfg.quant_type}"] = ((_packed_json_len(record),), torch.uint8)
    out: dict[str, Spec] = {f"{name}.q": (((n + 1) // 2, 1), torch.uint8)}
    out.update({f"{name}.qs.{field}": spec for field, spec in state.items()})
    return out


def _stored_8bit(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg: Any) -> dict[str, Spec]:
    n = math.prod(shape)
    meta = {"dtype": str(dtype).removeprefix("torch."), "blocksize": cfg.blocksize}
    return {
        f"{name}.q": (shape, torch.uint8),
        f"{name}.qs.absmax": ((-(-n // cfg.blocksize),), torch.float32),
        f"{name}.qs.code": ((256,), torch.float32),
        f"{name}.qs.meta": ((_packed_json_len(meta, sort_keys=True),), torch.uint8),
    }


def _rule(codec: Any) -> Any:
    """The stored-tensor rule of `codec`'s class: None for a codec that stores weights as they are."""
    from strategies.compression.blockwise_4bit import Blockwise4bit
    from strategies.compression.blockwise_8bit import Blockwise8bit

    if not codec.lossy:
        return None
    for cls, rule in ((Blockwise4bit, _stored_4bit), (Blockwise8bit, _stored_8bit)):
        if isinstance(codec, cls):
            return rule
    raise ValueError(f"no stored-size rule for the codec {type(codec).__name__}: add one to {__name__}")


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
    """What `codec.encode(unit, tensors)` stores, as shapes and dtypes."""
    from strategies.compression.blockwise import should_compress

    rule = _rule(codec)
    stored: dict[str, Spec] = {}
    for name, (shape, dtype) in tensors.items():
        meta = torch.empty(shape, dtype=dtype, device="meta")  # the codec's own test, on a weightless tensor
        if rule is not None and should_compress(unit, name, meta, codec.cfg.compress_embeddings):
            stored.update(rule(name, shape, dtype, codec.cfg))
        else:
            stored[name] = (shape, dtype)
    return stored


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
