"""Split a checkpoint into one safetensors file per layer unit (see layout.py), plus a manifest.

The split is streamed (one unit in memory at a time), atomic (temporary name, then
rename; the manifest is written last) and resumable: every finished file is recorded in
a journal, so a rerun after an interruption redoes only missing or invalid files and
ends byte-identical to an uninterrupted split. The units' tensors come from a tensor source
(sources.py): a checkpoint's safetensors files, or the generator of a weightless generated
checkpoint, which draws each unit straight into its split file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save
from transformers import LlamaConfig

from harness import __version__
from harness.allocator import host_malloc
from harness.checkpoints.generated import GENERATOR_FILE
from harness.files import exclusive_lock, write_atomic
from harness.measurement.environment import usable_cores
from harness.measurement.memory import RssSampler
from harness.split.integrity import CorruptFileError, check_split_file
from harness.split.layout import MANIFEST, SplitLayout, unit_names
from harness.split.manifest import read_journal, read_manifest
from harness.split.sources import TensorSource, open_source
from strategies.compression.base import Codec

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
LOCK = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
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
    """Cheap identity of a checkpoint: its config, index and generator recipe bytes and each weight file's size and
    mtime.

    Stat, not hash: reusing a split must not read the (possibly 16 GB) source.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", GENERATOR_FILE):
        path = ckpt_dir / name
        if path.exists():
            h.update(name.encode() + path.read_bytes())
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_workers(files: int) -> int:
    """Threads to hash a split's files with: hashlib releases the GIL on large buffers, so each core hashes a
    file; at most 8, so that a cold read from a disk is not split among more readers than it serves well."""
    return max(1, min(files, usable_cores() or 1, 8))


def _tensor_records(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in sorted(tensors.items())
    }


def _valid_files(split_dir: Path, records: dict[str, dict[str, Any]], verify: bool) -> set[str]:
    """Units whose file matches its record: size and header always (cheap), the checksum too when `verify`.

    A mismatch is logged naming the file, and the file is rewritten.
    """
    valid = set()
    for unit, rec in records.items():
        try:
            check_split_file(split_dir / rec["file"], rec)
        except CorruptFileError as e:
            log.warning("split file %s; rewriting it", e)
            continue
        valid.add(unit)
    if not verify or not valid:
        return valid
    units = sorted(valid)
    with ThreadPoolExecutor(_hash_workers(len(units))) as pool:
        digests = pool.map(sha256_file, [split_dir / records[u]["file"] for u in units])
        for unit, digest in zip(units, digests, strict=True):
            if digest != records[unit]["sha256"]:
                log.warning("split file %s fails its checksum (corrupted or edited); rewriting it",
                            split_dir / records[unit]["file"])
                valid.discard(unit)
    return valid


@host_malloc("glibc")  # untimed, and blocks of many sizes: glibc's defaults hand them back after
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

    The checkpoint is checked first, from its headers (source_check.check_checkpoint_tensors): one that lacks a
    tensor, holds an odd one or mixes dtypes raises ValueError saying which, and nothing is written. A weightless
    generated checkpoint (generated.GENERATOR_FILE) is split by drawing each unit from its recipe: only with a
    codec that compresses, since an uncompressed split would hold the whole bf16 checkpoint (ValueError, with the
    numbers).

    `verify`: re-hash every file against the manifest. Without it a reused file still has its
    size and safetensors header checked, but a changed byte among its weights goes unnoticed.

    `encode_device`: where a lossy codec quantizes (a GPU does the 8B geometry's 4-bit split in
    seconds, a CPU in minutes). Its codes may differ in the last bit from a CPU's, so such a split
    says where it was encoded and is not mixed with one encoded elsewhere.
    """
    started = time.perf_counter()
    fingerprint = source_fingerprint(ckpt_dir)
    # Before the split folder exists, and on reuse too: a checkpoint that cannot run leaves nothing behind, and
    # a split written from one before this check existed is refused like a new one. Headers only: milliseconds.
    source = open_source(ckpt_dir, config)
    if source.generates and not codec.lossy:
        from harness.split.direct import uncompressed_refusal

        raise ValueError(uncompressed_refusal(source.name, config, codec.split_key))
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

    def waiting() -> None:
        log.info("another process is splitting into %s; waiting for it to finish, then reusing its files", split_dir)

    before_lock = time.perf_counter() - started
    # One writer per split folder: a second process waits here, then finds the split finished and reuses it.
    with exclusive_lock(split_dir / LOCK, on_wait=waiting):
        locked = time.perf_counter()
        try:
            layout, stats = _ensure_split_locked(source, config, codec, split_dir, header, verify, encode_device)
        finally:
            source.close()
    # The time spent waiting for another process's split is not this one's split time.
    stats.split_s = before_lock + time.perf_counter() - locked
    return layout, stats


def _ensure_split_locked(
    source: TensorSource,
    config: LlamaConfig,
    codec: Codec,
    split_dir: Path,
    header: dict[str, Any],
    verify: bool,
    encode_device: torch.device,
) -> tuple[SplitLayout, SplitStats]:
    units = unit_names(config.num_hidden_layers)
    file_units = [u for u in units if not (u == "lm_head" and config.tie_word_embeddings)]

    manifest_path = split_dir / MANIFEST
    on_disk = read_manifest(manifest_path)
    records: dict[str, dict[str, Any]] = {}
    if on_disk is not None and {k: on_disk.get(k) for k in header} == header:
        records = on_disk["files"]
    if not records:
        records = read_journal(split_dir / JOURNAL, header)
    valid = _valid_files(split_dir, {u: records[u] for u in file_units if u in records}, verify)
    todo = [u for u in file_units if u not in valid]

    stats = SplitStats(0.0, bool(todo), 0, 0, 0, 0)
    if todo:
        kept = {u: records[u] for u in file_units if u in valid}
        records = _write_files(source, codec, split_dir, header, kept, todo, encode_device, stats)

    manifest = {
        **header,
        "files": {u: records[u] for u in file_units},
        "aliases": {"lm_head": "embed"} if config.tie_word_embeddings else {},
    }
    if manifest != on_disk:  # missing, invalid, stale, or out of date after a rewrite
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        with _explain_disk_full(manifest_path, len(data), 0, 0, len(file_units)):
            write_atomic(manifest_path, data)
    (split_dir / JOURNAL).unlink(missing_ok=True)
    stats.largest_file_bytes = max(r["bytes"] for r in manifest["files"].values())
    return SplitLayout(split_dir, manifest), stats


def _write_files(
    source: TensorSource,
    codec: Codec,
    split_dir: Path,
    header: dict[str, Any],
    kept: dict[str, dict[str, Any]],
    todo: list[str],
    encode_device: torch.device,
    stats: SplitStats,
) -> dict[str, dict[str, Any]]:
    """Write the files of `todo`, journaling each, one unit's tensors in memory at a time; returns the records of
    `kept` and of the files written."""
    source_bytes = source.unit_bytes()
    # Under the lock nobody else writes here: a temporary file is what a killed run left behind.
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    # Records of still-valid files keep their place; the journal is rewritten so it never
    # vouches for a file that is about to be replaced.
    journal_lines = [json.dumps(header)] + [json.dumps({"unit": u, "record": r}) for u, r in kept.items()]
    journal_data = ("\n".join(journal_lines) + "\n").encode()
    todo_bytes = sum(source_bytes[u] for u in todo)
    with _explain_disk_full(split_dir / JOURNAL, len(journal_data), todo_bytes, len(todo), len(kept)):
        write_atomic(split_dir / JOURNAL, journal_data)
    records = dict(kept)
    log.info("splitting %s into %s: %d of %d files to write", source, split_dir, len(todo), len(kept) + len(todo))
    # Unbuffered: a failed append leaves nothing pending that closing the file would try, and fail, to write again.
    with RssSampler() as rss, _progress() as progress, open(split_dir / JOURNAL, "ab", buffering=0) as journal:
        task = progress.add_task("split", total=len(todo))
        for i, unit in enumerate(todo):
            progress.update(task, description=f"split {unit}")
            # On the host from files; a generator on the GPU hands them over there, where a GPU split encodes them.
            tensors = source.unit_tensors(unit)
            if codec.lossy and encode_device.type != "cpu":
                on_device = {k: t.to(encode_device) for k, t in tensors.items()}
                stored = {k: t.cpu() for k, t in codec.encode(unit, on_device).items()}
            else:
                stored = codec.encode(unit, {k: t.cpu() for k, t in tensors.items()})
            # One metadata key only: safetensors writes metadata in hash-map order, so several keys
            # would make identical splits differ byte for byte. Hashing the serialized bytes
            # avoids reading the file back.
            data = save(stored, metadata={"format": "pt"})
            file_name = f"{unit}.safetensors"
            rec = {
                "file": file_name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "tensors": _tensor_records(stored),
            }
            # What the files after this one need, estimated at this file's stored bytes per source byte.
            later = todo[i + 1:]
            later_bytes = sum(source_bytes[u] for u in later) * len(data) // max(1, source_bytes[unit])
            with _explain_disk_full(split_dir / file_name, len(data), later_bytes, len(later), len(records)):
                write_atomic(split_dir / file_name, data)
                journal.write((json.dumps({"unit": unit, "record": rec}) + "\n").encode())
                os.fsync(journal.fileno())
            del tensors, stored, data
            records[unit] = rec
            stats.files_written += 1
            stats.bytes_written += rec["bytes"]
            progress.advance(task)
    stats.peak_anon_delta_bytes = rss.peak_delta_bytes
    return records


@contextmanager
def _explain_disk_full(path: Path, need: int, later_bytes: int, later_files: int, kept: int) -> Iterator[None]:
    """Turn a full disk while writing `path` into an error that says what the split needs and what is free.

    The partial temporary file is already gone (write_atomic removes it), and the files written
    so far stay: a rerun with room resumes from them.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            e.errno,
            f"disk full while writing {path.name} into the split folder {path.parent}: that file needs "
            f"{_size(need)}, the {later_files} split files after it about {_size(later_bytes)} more, "
            f"{_size(need + later_bytes)} in all; {_size(free)} is free there. Free that much space there, or set "
            f"split.dir to a folder on a disk with room, then rerun: the {kept} files already written are kept",
        ) from e


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.2f} GiB)" if n >= 2**30 else f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} files"),
        TimeRemainingColumn(),
        transient=False,
    )

