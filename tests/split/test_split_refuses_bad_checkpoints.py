"""harness.split.source_check through ensure_split: a checkpoint that lacks a tensor or mixes dtypes is refused
before anything is written, naming the checkpoint, the tensor and what to do; a sound one still splits."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from split_files import codec
from transformers import LlamaConfig

import harness.split.source_check as source_mod
from harness.split.writer import ensure_split

INDEX = "model.safetensors.index.json"
UP = "model.layers.1.mlp.up_proj.weight"

Tensors = dict[str, torch.Tensor]


def edited_copy(ckpt: Path, dest: Path, edit: Callable[[str, Tensors], None]) -> Path:
    """A copy of the tiny checkpoint with each shard's tensors passed through `edit(shard name, tensors)`."""
    shutil.copytree(ckpt, dest)
    for shard in sorted(set(json.loads((dest / INDEX).read_text())["weight_map"].values())):
        tensors = load_file(dest / shard)
        edit(shard, tensors)
        save_file(tensors, dest / shard, metadata={"format": "pt"})
    return dest


def shard_of(ckpt: Path, name: str) -> str:
    return json.loads((ckpt / INDEX).read_text())["weight_map"][name]


def to_float32(*names: str) -> Callable[[str, Tensors], None]:
    def edit(shard: str, tensors: Tensors) -> None:
        for name in names:
            if name in tensors:
                tensors[name] = tensors[name].float()

    return edit


def test_mixed_dtype_checkpoint_is_refused_naming_the_tensor_before_any_write(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    mixed = edited_copy(ckpt, tmp_path / "mixed", to_float32(UP))
    with pytest.raises(ValueError) as refused:
        ensure_split(mixed, config, codec(), tmp_path / "splits")
    message = str(refused.value)
    assert str(mixed / shard_of(mixed, UP)) in message, "names the checkpoint file"
    assert f"tensor {UP} is float32" in message and "declares dtype bfloat16" in message
    assert "re-save the checkpoint in bfloat16" in message
    assert not (tmp_path / "splits").exists(), "no split folder, file or manifest is left behind"


def test_every_tensor_not_in_the_declared_dtype_is_counted(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    odd = (UP, "model.layers.2.self_attn.q_proj.weight", "model.norm.weight")
    mixed = edited_copy(ckpt, tmp_path / "mixed", to_float32(*odd))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(UP)} is float32.*2 more tensor\(s\) are not bfloat16"):
        ensure_split(mixed, config, codec(), tmp_path / "splits")


def test_checkpoint_wholly_in_another_dtype_than_declared_is_refused_with_the_config_fix(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    def all_float32(shard: str, tensors: Tensors) -> None:
        tensors.update({name: t.float() for name, t in tensors.items()})

    other = edited_copy(ckpt, tmp_path / "other", all_float32)
    with pytest.raises(ValueError, match=r'set "dtype" \(or "torch_dtype"\) in config.json to "float32"'):
        ensure_split(other, config, codec(), tmp_path / "splits")


def test_without_a_declared_dtype_the_odd_tensor_out_is_named(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    undeclared = LlamaConfig(**{**config.to_dict(), "dtype": None})
    assert undeclared.dtype is None
    mixed = edited_copy(ckpt, tmp_path / "mixed", to_float32(UP))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(UP)} is float32, but .* are bfloat16 \(config.json "
                                         r"declares no dtype\)"):
        ensure_split(mixed, undeclared, codec(), tmp_path / "splits")
    _, stats = ensure_split(ckpt, undeclared, codec(), tmp_path / "splits")
    assert stats.files_written == config.num_hidden_layers + 3, "a checkpoint in one dtype needs no declared one"


def test_split_written_before_the_dtype_check_is_refused_on_rerun(
    ckpt: Path, config: LlamaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mixed = edited_copy(ckpt, tmp_path / "mixed", to_float32(UP))
    with pytest.raises(ValueError) as fresh:
        ensure_split(mixed, config, codec(), tmp_path / "fresh")
    # What a harness without the dtype check left: a finished split of the mixed checkpoint.
    with monkeypatch.context() as m:
        m.setattr(source_mod, "_check_dtypes", lambda *args: None)
        layout, _ = ensure_split(mixed, config, codec(), tmp_path / "splits")
    assert layout.manifest["files"]["layers.01"]["tensors"]["mlp.up_proj.weight"]["dtype"] == "float32"

    with pytest.raises(ValueError) as rerun:
        ensure_split(mixed, config, codec(), tmp_path / "splits")
    assert str(rerun.value) == str(fresh.value), "refused as a fresh split of it is"


def test_tied_checkpoints_stored_lm_head_copy_may_be_another_dtype(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    tied = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    copy = edited_copy(ckpt, tmp_path / "tied", to_float32("lm_head.weight"))
    layout, _ = ensure_split(copy, tied, codec(), tmp_path / "splits")
    assert "lm_head" not in layout.manifest["files"], "the model ignores the copy, so it is neither split nor checked"


def test_tensor_missing_from_its_shard_is_named_with_the_shard(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    def drop(shard: str, tensors: Tensors) -> None:
        tensors.pop(UP, None)

    broken = edited_copy(ckpt, tmp_path / "broken", drop)
    with pytest.raises(ValueError) as refused:
        ensure_split(broken, config, codec(), tmp_path / "splits")
    message = str(refused.value)
    assert f"checkpoint {broken} lacks 1 tensor(s)" in message
    assert f"places {UP} in {shard_of(broken, UP)}, which does not hold it" in message
    assert "download or copy the checkpoint again" in message
    assert not (tmp_path / "splits").exists()


def test_tensor_missing_from_the_checkpoint_and_its_index_is_named(
    ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    names = (UP, "model.layers.3.mlp.down_proj.weight")

    def drop(shard: str, tensors: Tensors) -> None:
        for name in names:
            tensors.pop(name, None)

    broken = edited_copy(ckpt, tmp_path / "broken", drop)
    index = json.loads((broken / INDEX).read_text())
    for name in names:
        del index["weight_map"][name]
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(broken))} lacks 2 tensor\(s\) .*needs: "
                                         rf"{re.escape(UP)}, model\.layers\.3\.mlp\.down_proj\.weight\. "):
        ensure_split(broken, config, codec(), tmp_path / "splits")
    assert not (tmp_path / "splits").exists()


def test_shard_listed_in_the_index_but_absent_is_named(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    shutil.copytree(ckpt, tmp_path / "partial")
    (tmp_path / "partial" / shard_of(ckpt, UP)).unlink()
    with pytest.raises(ValueError, match=rf"lists the shard {re.escape(shard_of(ckpt, UP))}, which is not in"):
        ensure_split(tmp_path / "partial", config, codec(), tmp_path / "splits")


def test_checkpoint_in_its_declared_dtype_still_splits(ckpt: Path, config: LlamaConfig, tmp_path: Path) -> None:
    copy = edited_copy(ckpt, tmp_path / "copy", lambda shard, tensors: None)
    layout, stats = ensure_split(copy, config, codec(), tmp_path / "splits")
    assert stats.files_written == config.num_hidden_layers + 3
    dtypes = {t["dtype"] for rec in layout.manifest["files"].values() for t in rec["tensors"].values()}
    assert dtypes == {"bfloat16"}
    _, again = ensure_split(copy, config, codec(), tmp_path / "splits")
    assert not again.fresh, "the check on reuse passes, and the split is reused"
