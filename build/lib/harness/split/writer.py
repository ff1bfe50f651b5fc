"""Split a checkpoint into one safetensors file per layer unit (see layout.py), plus a manifest.

The split is streamed (one unit in memory at a time), atomic (temporary name, then
rename; the manifest is written last) and resumable: every finished file is recorded in
a journal, so a rerun after an interruption redoes only missing or invalid files and
ends byte-identical to an uninterrupted split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

from harness import __version__
from harness.checkpoints.local import checkpoint_tensor_index
from harness.files import write_atomic
from harness.measurement.memory import RssSampler
from harness.split.layout import MANIFEST, SplitLayout, unit_names, unit_of
from strategies.compression.base import Codec

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
CPU = torch.device("cpu")
FORMAT = "layerbench-split/1"


@dataclass
class SplitStats:
    split_s: float
    fresh: bool  # some file was (re)written in this call
    files_written: int
    bytes_written: int
    peak_anon_delta_bytes: int
    largest_file_bytes: int


def source_fingerprint(ckpt_dir: Path) -> str:
    """Cheap identity of a checkpoint: its config and index bytes and each weight file's size and mtime.

    Stat, not hash: reusing a split must not read the (possibly 16 GB) source.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        path = ckpt_dir / name
        if path.exists():
            h.update(name.encode() + path.read_bytes())
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint_tensors(ckpt_dir: Path, config: LlamaConfig) -> dict[str, str]:
    """Every tensor the Llama model needs is in the checkpoint with its shape, and nothing else is.

    Expected names and shapes come from transformers' own model built on the meta device,
    so this catches a wrong geometry before any weight is read. Returns tensor -> file.
    """
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    index = checkpoint_tensor_index(ckpt_dir)
    found: dict[str, tuple[int, ...]] = {}
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in index.items():
        by_file[file].append(name)
    for file, names in by_file.items():
        with safe_open(ckpt_dir / file, framework="pt") as f:
            for name in names:
                found[name] = tuple(f.get_slice(name).get_shape())
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints still store a copy; the model ignores it
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(
            f"checkpoint {ckpt_dir} does not match its config.json: "
            f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise ValueError(
                f"checkpoint tensor {name} in {index[name]} has shape {list(found[name])}, "
                f"but config.json implies {list(shape)}"
            )
    return {name: file for name, file in index.items() if name in expected}


def _tensor_records(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in sorted(tensors.items())
    }


def _valid_files(split_dir: Path, records: dict[str, dict[str, Any]], verify: bool) -> set[str]:
    """Units whose file on disk matches its record; a mismatch is logged naming the file."""
    valid = set()
    for unit, rec in records.items():
        path = split_dir / rec["file"]
        if not path.exists():
            log.warning("split file %s is missing; it will be rewritten", path)
        elif path.stat().st_size != rec["bytes"]:
            log.warning("split file %s has %d bytes, manifest says %d; rewriting it",
                        path, path.stat().st_size, rec["bytes"])
        elif verify and sha256_file(path) != rec["sha256"]:
            log.warning("split file %s fails its checksum (corrupted or edited); rewriting it", path)
        else:
            valid.add(unit)
    return valid


def _read_journal(split_dir: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    path = split_dir / JOURNAL
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]) != header:
            return {}
    except json.JSONDecodeError:
        return {}
    records = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a record cut short by the interruption: its file gets redone
        records[rec["unit"]] = rec["record"]
    return records


def ensure_split(
    ckpt_dir: Path,
    config: LlamaConfig,
    codec: Codec,
    splits_root: Path,
    *,
    verify: bool = True,
    encode_device: torch.device = CPU,
) -> tuple[SplitLayout, SplitStats]:
    """Return a valid split of `ckpt_dir` for `codec`, writing only what is missing or invalid.

    `encode_device`: where a lossy codec quantizes (a GPU does the 8B geometry's 4-bit split in
    seconds, a CPU in minutes). Its codes may differ in the last bit from a CPU's, so such a split
    says where it was encoded and is not mixed with one encoded elsewhere.
    """
    started = time.perf_counter()
    fingerprint = source_fingerprint(ckpt_dir)
    split_dir = splits_root / f"{ckpt_dir.name}-{fingerprint[:12]}" / codec.split_key
    split_dir.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "harness_version": __version__,
        "source_fingerprint": fingerprint,
        "compression": codec.split_key,
        "num_hidden_layers": config.num_hidden_layers,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }
    if codec.lossy and encode_device.type != "cpu":
        header["encoded_on"] = encode_device.type
    units = unit_names(config.num_hidden_layers)
    file_units = [u for u in units if not (u == "lm_head" and config.tie_word_embeddings)]

    manifest_path = split_dir / MANIFEST
    records: dict[str, dict[str, Any]] = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in header} == header:
            records = manifest["files"]
    if not records:
        records = _read_journal(split_dir, header)
    valid = _valid_files(split_dir, records, verify) if records else set()
    todo = [u for u in file_units if u not in valid]

    stats = SplitStats(0.0, bool(todo), 0, 0, 0, 0)
    if todo:
        tensor_files = check_checkpoint_tensors(ckpt_dir, config)
        by_unit: dict[str, list[str]] = defaultdict(list)
        for name in tensor_files:
            by_unit[unit_of(name, config.num_hidden_layers)[0]].append(name)
        # Records of still-valid files keep their place; the journal is rewritten so it never
        # vouches for a file that is about to be replaced.
        kept = {u: records[u] for u in file_units if u in valid}
        journal_lines = [json.dumps(header)] + [json.dumps({"unit": u, "record": r}) for u, r in kept.items()]
        write_atomic(split_dir / JOURNAL, ("\n".join(journal_lines) + "\n").encode())
        records = dict(kept)
        log.info("splitting %s into %s: %d of %d files to write", ckpt_dir, split_dir, len(todo), len(file_units))
        with RssSampler() as rss, _progress() as progress, open(split_dir / JOURNAL, "a") as journal:
            task = progress.add_task("split", total=len(todo))
            handles: dict[str, Any] = {}
            for unit in todo:
                progress.update(task, description=f"split {unit}")
                tensors = {}
                for name in sorted(by_unit[unit]):
                    file = tensor_files[name]
                    if file not in handles:
                        handles[file] = safe_open(ckpt_dir / file, framework="pt")
                    tensors[unit_of(name, config.num_hidden_layers)[1]] = handles[file].get_tensor(name)
                if codec.lossy and encode_device.type != "cpu":
                    on_device = {k: t.to(encode_device) for k, t in tensors.items()}
                    stored = {k: t.cpu() for k, t in codec.encode(unit, on_device).items()}
                else:
                    stored = codec.encode(unit, tensors)
                # One metadata key only: safetensors writes metadata in hash-map order, so several keys
                # would make identical splits differ byte for byte. Hashing the serialized bytes
                # avoids reading the file back.
                data = save(stored, metadata={"format": "pt"})
                file_name = f"{unit}.safetensors"
                write_atomic(split_dir / file_name, data)
                rec = {
                    "file": file_name,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "tensors": _tensor_records(stored),
                }
                del tensors, stored, data
                journal.write(json.dumps({"unit": unit, "record": rec}) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
                records[unit] = rec
                stats.files_written += 1
                stats.bytes_written += rec["bytes"]
                progress.advance(task)
            handles.clear()
        stats.peak_anon_delta_bytes = rss.peak_delta_bytes

    manifest = {
        **header,
        "files": {u: records[u] for u in file_units},
        "aliases": {"lm_head": "embed"} if config.tie_word_embeddings else {},
    }
    if todo or not manifest_path.exists():
        write_atomic(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    (split_dir / JOURNAL).unlink(missing_ok=True)
    stats.largest_file_bytes = max(r["bytes"] for r in manifest["files"].values())
    stats.split_s = time.perf_counter() - started
    return SplitLayout(split_dir, manifest), stats


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} files"),
        TimeRemainingColumn(),
        transient=False,
    )

