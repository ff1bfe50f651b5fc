"""The cheap check of a split file: its size and its safetensors header, without reading the weights.

It runs on every reuse, `split.verify=false` included, so a truncated or corrupted file is named and
rewritten instead of failing later inside safetensors with a message that names no file. Only the
full check (`split.verify=true`, a sha256 of every file) also catches a changed byte among the weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

# safetensors' dtype names -> bytes per element (for a tensor's size from its header).
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class CorruptFileError(ValueError):
    """A file that is not what it should be; the message starts with its path."""


def tensor_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and dtype from a safetensors file's header, which safetensors validates as it
    opens the file (JSON, offsets tiling the data area exactly); the weights are mapped, not read.
    Raises CorruptFileError naming the file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{path}: not a sound safetensors file ({e})") from None


def tensor_bytes(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * ITEM_BYTES[dtype]


def check_split_file(path: Path, record: dict[str, Any]) -> None:
    """`path` has the size its manifest record says, a sound header, and the record's tensors and shapes.

    Raises CorruptFileError naming the file and what is wrong with it.
    """
    if not path.is_file():
        raise CorruptFileError(f"{path}: missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CorruptFileError(f"{path}: {size} bytes, its manifest says {record['bytes']}")
    found = {name: shape for name, (shape, _) in tensor_shapes(path).items()}
    expected = {name: t["shape"] for name, t in record["tensors"].items()}
    if found != expected:
        differ = sorted(n for n in found.keys() | expected.keys() if found.get(n) != expected.get(n))
        raise CorruptFileError(f"{path}: its header's tensors differ from its manifest's at {differ[:5]}")
