"""Faults a hostile user found in the split (issue #12): each is named, and a rerun still gets a valid split."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

# The split tests' helpers (tests/ is on sys.path: the rootdir conftest's folder).
from split_files import codec, tree
from transformers import LlamaConfig

import harness.files as files_mod
import harness.split.writer as split_mod
from harness.split.writer import ensure_split
from strategies.compression.none import NoCompression


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# --- 3: an invalid manifest counts as a missing one -------------------------------------------------------------


def _truncated(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest)[:44]


def _without_bytes(manifest: dict[str, Any]) -> str:
    del manifest["files"]["layers.01"]["bytes"]
    return json.dumps(manifest)


def _bytes_as_text(manifest: dict[str, Any]) -> str:
    manifest["files"]["layers.01"]["bytes"] = str(manifest["files"]["layers.01"]["bytes"])
    return json.dumps(manifest)


def _file_outside(manifest: dict[str, Any]) -> str:
    manifest["files"]["layers.01"]["file"] = "../../../config.json"
    return json.dumps(manifest)


def _alias_to_nothing(manifest: dict[str, Any]) -> str:
    manifest["aliases"] = {"lm_head": "head"}
    return json.dumps(manifest)


@pytest.mark.parametrize(
    ("damage", "fault"),
    [
        (_truncated, "not valid JSON"),
        (lambda m: "", "not valid JSON"),
        (lambda m: "[]", "JSON array"),
        (lambda m: "null", "JSON null"),
        (lambda m: '{"format": 1}', "format is 1, not a string"),
        (_without_bytes, "files['layers.01'].bytes is null"),
        (_bytes_as_text, "files['layers.01'].bytes is \"370000\", not an integer"),
        (_file_outside, "files['layers.01'].file"),
        (_alias_to_nothing, "aliases['lm_head']"),
    ],
    ids=["truncated", "empty", "list", "null", "wrong-type", "no-bytes", "bytes-as-text", "file-outside", "alias"],
)
def test_invalid_manifest_is_named_and_the_split_rebuilt(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, fault: str
) -> None:
    layout, _ = ensure_split(ckpt, config, codec(), tmp_path)
    whole = tree(tmp_path)
    manifest_path = layout.dir / "manifest.json"
    manifest_path.write_text(damage(json.loads(manifest_path.read_text())))

    with caplog.at_level(logging.WARNING):
        again, stats = ensure_split(ckpt, config, codec(), tmp_path)
    assert str(manifest_path) in caplog.text and "invalid" in caplog.text and fault in caplog.text
    assert stats.fresh and again.manifest == layout.manifest
    assert tree(tmp_path) == whole, "the manifest is rewritten and the files are as before"
    _, stats = ensure_split(ckpt, config, codec(), tmp_path)
    assert not stats.fresh, "the next run trusts the rewritten manifest"


def test_damaged_journal_line_stops_the_resume_there(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    layout, _ = ensure_split(ckpt, config, codec(), tmp_path)
    whole = tree(tmp_path)
    # What an interrupted split leaves, with its third record of the wrong shape (it was a KeyError).
    (layout.dir / "manifest.json").unlink()
    header = {k: v for k, v in layout.manifest.items() if k not in ("files", "aliases")}
    lines = [header, *({"unit": u, "record": r} for u, r in layout.manifest["files"].items())]
    lines[3] = {"unit": "layers.01", "record": []}
    (layout.dir / "journal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    _, stats = ensure_split(ckpt, config, codec(), tmp_path)
    assert stats.files_written == config.num_hidden_layers + 3 - 2, "the two records before the damaged one are kept"
    assert tree(tmp_path) == whole


# --- 4: two processes splitting into one folder -----------------------------------------------------------------


def _split_in_child(ckpt: Path, config: LlamaConfig, root: Path, start: Any, results: Any) -> None:
    real_encode = NoCompression.encode

    def slow_encode(self, unit, tensors):
        time.sleep(0.05)  # the tiny model splits in milliseconds: long enough that the two splits overlap
        return real_encode(self, unit, tensors)

    NoCompression.encode = slow_encode
    start.wait(timeout=60)
    _, stats = ensure_split(ckpt, config, codec(), root, verify=False)
    results.put(stats.files_written)


def test_two_processes_split_into_one_folder_at_once(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    # fork: the children start with this process's imports (a spawned one takes seconds to import torch).
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_split_in_child, args=(ckpt, config, tmp_path, start, results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
    assert [child.exitcode for child in children] == [0, 0]
    written = sorted(results.get(timeout=5) for _ in children)
    assert written == [0, config.num_hidden_layers + 3], "one process splits, the other waits and reuses its split"

    _, stats = ensure_split(ckpt, config, codec(), tmp_path, verify=True)
    assert stats.files_written == 0, "the split verifies"
    assert not temporaries(tmp_path) and not list(tmp_path.rglob("journal.jsonl"))


def _take_lock(path: Path, held: Any, waiting: Any) -> None:
    held.wait(timeout=60)
    with files_mod.exclusive_lock(path, on_wait=waiting.set):
        pass


def test_a_second_holder_waits_for_the_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    held, waiting = ctx.Event(), ctx.Event()
    # Started before the lock is taken: a child forked while holding it would inherit the holding descriptor.
    child = ctx.Process(target=_take_lock, args=(tmp_path / ".lock", held, waiting))
    child.start()
    with files_mod.exclusive_lock(tmp_path / ".lock"):
        held.set()
        waited = waiting.wait(timeout=60)
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert waited, "the second holder was not told to wait"
    assert child.exitcode == 0, "the second holder got the lock once it was given back"


# --- 6: split.verify=false still checks sizes and headers -------------------------------------------------------


def _bad_utf8(data: bytearray) -> None:
    data[10] = 0xFF


def _shifted_offset(data: bytearray) -> None:
    at = data.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    data[at] = ord("1") if data[at] != ord("1") else ord("2")


def _huge_length(data: bytearray) -> None:
    data[0:8] = (1 << 40).to_bytes(8, "little")


def _header_not_object(data: bytearray) -> None:
    length = int.from_bytes(data[0:8], "little")
    data[8:8 + length] = b"[" + b" " * (length - 2) + b"]"


@pytest.mark.parametrize(
    ("damage", "fault"),
    [
        (_bad_utf8, "invalid UTF-8 in header"),
        (_shifted_offset, "invalid offset for tensor"),
        (_huge_length, "header too large"),
        (_header_not_object, "invalid JSON in header"),
    ],
    ids=["utf8", "offset", "length", "array"],
)
def test_damaged_header_is_named_and_rewritten_without_verify(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, fault: str
) -> None:
    layout, _ = ensure_split(ckpt, config, codec(), tmp_path)
    victim = layout.file("layers.01")
    original = victim.read_bytes()
    data = bytearray(original)
    damage(data)
    assert len(data) == len(original)
    victim.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="harness.split.writer"):
        _, stats = ensure_split(ckpt, config, codec(), tmp_path, verify=False)
    assert str(victim) in caplog.text and fault in caplog.text and "rewriting it" in caplog.text
    assert stats.files_written == 1
    assert victim.read_bytes() == original


def test_fast_path_reads_no_weights(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_split(ckpt, config, codec(), tmp_path)

    def no_hash(path: Path) -> str:
        raise AssertionError(f"{path} was hashed with verify=false")

    monkeypatch.setattr(split_mod, "sha256_file", no_hash)
    _, stats = ensure_split(ckpt, config, codec(), tmp_path, verify=False)
    assert stats.files_written == 0


# --- 7: disk full during a split --------------------------------------------------------------------------------


class _FullDisk:
    """A file that takes half of what is written to it, then reports a full disk."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_names_the_folder_and_sizes_then_resumes(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = ensure_split(ckpt, config, codec(), tmp_path / "whole")
    real_open = open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if "layers.02.safetensors" in str(file) and "w" in mode else f

    monkeypatch.setattr(files_mod, "open", open_on_full_disk, raising=False)
    with pytest.raises(OSError) as raised:
        ensure_split(ckpt, config, codec(), tmp_path / "full")
    monkeypatch.undo()

    (split_dir,) = [p.parent for p in (tmp_path / "full").rglob("journal.jsonl")]
    message = str(raised.value)
    need = reference.file_bytes("layers.02")
    assert raised.value.errno == errno.ENOSPC
    assert str(split_dir) in message and "layers.02.safetensors" in message
    assert f"{need:,} bytes" in message and "free" in message and "in all" in message, message
    assert not temporaries(tmp_path / "full"), "the partial temporary file is removed"

    _, stats = ensure_split(ckpt, config, codec(), tmp_path / "full")
    assert stats.files_written == config.num_hidden_layers + 3 - 3, "the files written before the full disk are kept"
    assert tree(tmp_path / "full") == tree(tmp_path / "whole")
