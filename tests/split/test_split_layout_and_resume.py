"""harness.split.writer: a split's layout and manifest; an interrupted split resumes byte-identical, a corrupted
file is named and rewritten, a valid split is reused without reading the source's weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file
from split_files import codec, tree
from transformers import LlamaConfig

import harness.split.sources as sources_mod
from harness.split.layout import unit_names
from harness.split.writer import ensure_split
from strategies.compression.none import NoCompression


class Interrupt(BaseException):
    """Stands in for Ctrl-C or a kill: not an Exception, so nothing may swallow it."""


def test_layout_and_manifest(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    layout, stats = ensure_split(ckpt, config, codec(), tmp_path)
    n = config.num_hidden_layers
    assert layout.units == unit_names(n) == ["embed", *[f"layers.{i:02d}" for i in range(n)], "norm", "lm_head"]
    assert stats.fresh and stats.files_written == n + 3
    manifest = json.loads((layout.dir / "manifest.json").read_text())
    assert manifest["compression"] == "none" and manifest["num_hidden_layers"] == n
    assert manifest["source_fingerprint"] and manifest["harness_version"]
    rec = manifest["files"]["layers.00"]
    assert rec["tensors"]["self_attn.q_proj.weight"]["dtype"] == "bfloat16"
    assert rec["tensors"]["self_attn.k_proj.weight"]["shape"] == [
        config.num_key_value_heads * config.head_dim, config.hidden_size
    ]
    assert rec["bytes"] == (layout.dir / rec["file"]).stat().st_size
    # A decoder layer file holds exactly what LlamaDecoderLayer's state dict names.
    assert set(load_file(layout.file("layers.00"))) == {
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    }
    assert not (layout.dir / "journal.jsonl").exists()
    # The split holds about one layer at a time, not the model (the tiny model is too small for RSS to
    # resolve a single layer, so bound it by the whole checkpoint).
    assert stats.peak_anon_delta_bytes < 4 * sum(r["bytes"] for r in manifest["files"].values()) + (64 << 20)


def test_interrupted_split_resumes_byte_identical(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_split(ckpt, config, codec(), tmp_path / "whole")

    calls = {"n": 0}
    real_encode = NoCompression.encode

    def encode_then_die(self, unit, tensors):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupt()
        return real_encode(self, unit, tensors)

    monkeypatch.setattr(NoCompression, "encode", encode_then_die)
    with pytest.raises(Interrupt):
        ensure_split(ckpt, config, codec(), tmp_path / "resumed")
    monkeypatch.setattr(NoCompression, "encode", real_encode)

    (split_dir,) = [p.parent for p in (tmp_path / "resumed").rglob("journal.jsonl")]
    assert not (split_dir / "manifest.json").exists(), "no manifest may vouch for a half-done split"
    assert len(list(split_dir.glob("*.safetensors"))) == 3
    # What a kill during a write leaves behind: a temporary file and a torn journal line.
    (split_dir / "layers.01.safetensors.tmp").write_bytes(b"partial")
    with open(split_dir / "journal.jsonl", "a") as f:
        f.write('{"unit": "layers.0')

    _, stats = ensure_split(ckpt, config, codec(), tmp_path / "resumed")
    assert stats.files_written == config.num_hidden_layers + 3 - 3, "only the missing files are redone"
    resumed = {k: v for k, v in tree(tmp_path / "resumed").items() if not k.endswith(".tmp")}
    assert resumed == tree(tmp_path / "whole")


def test_corrupted_file_is_named_and_rewritten(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout, _ = ensure_split(ckpt, config, codec(), tmp_path)
    # Two files, hashed on different threads: each is named and rewritten, and only they are.
    victims = [layout.file("layers.01"), layout.file("lm_head")]
    originals = [victim.read_bytes() for victim in victims]
    for victim, original in zip(victims, originals, strict=True):
        data = bytearray(original)
        data[-10] ^= 0xFF  # one byte of weight data: same size, wrong checksum
        victim.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="harness.split.writer"):
        _, stats = ensure_split(ckpt, config, codec(), tmp_path)
    for name in ("layers.01.safetensors", "lm_head.safetensors"):
        assert f"{name} fails its checksum" in caplog.text
    assert stats.files_written == 2
    assert [victim.read_bytes() for victim in victims] == originals


def test_valid_split_is_reused_without_reading_the_sources_weights(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the source's headers are read on reuse (harness.split.source_check); its tensor source
    (harness.split.sources) opens the files only to read weights."""
    ensure_split(ckpt, config, codec(), tmp_path)

    def no_source(*args, **kwargs):
        raise AssertionError("the source checkpoint's weights were read")

    monkeypatch.setattr(sources_mod, "safe_open", no_source)
    layout, stats = ensure_split(ckpt, config, codec(), tmp_path)
    assert not stats.fresh and stats.files_written == 0
    assert layout.file("embed").exists()


def test_checkpoint_that_does_not_match_its_config_is_refused(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    wrong = LlamaConfig(**{**config.to_dict(), "intermediate_size": config.intermediate_size * 2})
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        ensure_split(ckpt, wrong, codec(), tmp_path)
    assert not list(tmp_path.rglob("*.safetensors")), "nothing is written before the check passes"


def test_atomic_writes_keep_the_umask_mode(tmp_path: Path) -> None:
    """Split files, manifests and probe caches stay readable by whoever shares the outputs folder."""
    from harness.files import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "manifest.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "no temporary file is left behind"
