"""Reading a split's manifest and journal: a record that does not fit the schema is never trusted half-way.

An invalid manifest (truncated, empty, edited, of another shape) counts as a missing one: the
split is then checked and rewritten like an interrupted one, instead of every later run failing.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The fields the writer compares to decide whether a split is this checkpoint's, for this codec.
HEADER_TYPES: dict[str, type] = {
    "format": str,
    "harness_version": str,
    "source_fingerprint": str,
    "compression": str,
    "num_hidden_layers": int,
    "tie_word_embeddings": bool,
}
OPTIONAL_HEADER_TYPES: dict[str, type] = {"encoded_on": str}
SHA256 = re.compile(r"[0-9a-f]{64}")


KIND_NAMES = {int: "an integer", str: "a string", bool: "a boolean"}


def json_kind(value: Any) -> str:
    """What JSON calls the type of a parsed value, for messages about a file's contents."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")


def _type_problem(where: str, value: Any, kind: type) -> str | None:
    # bool is an int in Python; a layer count of `true` is still wrong.
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return None
    return f"{where} is {json.dumps(value)[:40]}, not {KIND_NAMES[kind]}"


def record_problem(unit: str, rec: Any) -> str | None:
    """What is wrong with one file record (`file`, `bytes`, `sha256`, `tensors`), or None."""
    at = f"files[{unit!r}]"
    if not isinstance(rec, dict):
        return f"{at} is a JSON {json_kind(rec)}, not an object"
    name = rec.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        return f"{at}.file is {json.dumps(name)[:60]}, not a file name in the split folder"
    if problem := _type_problem(f"{at}.bytes", rec.get("bytes"), int):
        return problem
    if rec["bytes"] < 0:
        return f"{at}.bytes is negative"
    if not isinstance(rec.get("sha256"), str) or not SHA256.fullmatch(rec["sha256"]):
        return f"{at}.sha256 is not 64 lowercase hex digits"
    tensors = rec.get("tensors")
    if not isinstance(tensors, dict):
        return f"{at}.tensors is not an object"
    for tensor, t in tensors.items():
        shape = t.get("shape") if isinstance(t, dict) else None
        ok_shape = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        if not ok_shape or not isinstance(t.get("dtype"), str):
            return f"{at}.tensors[{tensor!r}] has no valid shape and dtype"
    return None


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, or None when every field the writer and SplitLayout read is sound."""
    if not isinstance(data, dict):
        return f"it holds a JSON {json_kind(data)}, not an object"
    for key, kind in HEADER_TYPES.items():
        if key not in data:
            return f"it has no {key}"
        if problem := _type_problem(key, data[key], kind):
            return problem
    for key, kind in OPTIONAL_HEADER_TYPES.items():
        if key in data and (problem := _type_problem(key, data[key], kind)):
            return problem
    files, aliases = data.get("files"), data.get("aliases")
    if not isinstance(files, dict):
        return "its files is missing or not an object"
    for unit, rec in files.items():
        if problem := record_problem(unit, rec):
            return problem
    if not isinstance(aliases, dict):
        return "its aliases is missing or not an object"
    for unit, target in aliases.items():
        if not isinstance(target, str) or target not in files:
            return f"aliases[{unit!r}] is {json.dumps(target)[:40]}, which names no entry of files"
    return None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`; None when there is none or it is invalid (a warning then names it and the fault)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem: str | None = f"it is not valid JSON ({e})"
    else:
        problem = manifest_problem(data)
    if problem is None:
        return data
    log.warning(
        "split manifest %s is invalid: %s; treating it as missing: the split is rewritten", path, problem
    )
    return None


def read_journal(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file records of an interrupted split, if its journal was started for this `header`.

    Reading stops at the first line that is not a sound record (one cut short by the
    interruption, or damaged): the files from there on are redone.
    """
    if not path.exists():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    try:
        if not lines or json.loads(lines[0]) != header:
            return {}
    except json.JSONDecodeError:
        return {}
    records = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        unit = entry.get("unit") if isinstance(entry, dict) else None
        if not isinstance(unit, str) or record_problem(unit, entry.get("record")) is not None:
            break
        records[unit] = entry["record"]
    return records
