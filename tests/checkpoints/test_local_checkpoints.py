"""harness.checkpoints.local: a local checkpoint is used in place once it validates, and each way it can be
incomplete is named; its tensor index reads sharded and single-file checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.local import checkpoint_tensor_index
from harness.config import ModelConfig


def _local(path: Path) -> ModelConfig:
    return ModelConfig(name="local", source="local", path=str(path))


def _copy(tiny_dir: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny_dir, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


def test_local_checkpoint_validation(tiny_dir, tmp_path):
    good = _copy(tiny_dir, tmp_path / "good")
    assert ensure_checkpoint(_local(good), tmp_path / "outputs") == good.resolve()
    assert not (tmp_path / "outputs").exists(), "a local checkpoint is used in place"

    cases = {}
    cases["does not exist"] = tmp_path / "missing"
    cases["no config.json"] = tmp_path / "empty"
    cases["no config.json"].mkdir()
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    cases["model_type='mistral'"] = mistral
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    (bin_only / "tokenizer.json").write_text("{}")
    cases[r"no safetensors weights \(found only pytorch_model\.bin\).*converted"] = bin_only
    shard = "model-00002-of-00002.safetensors"
    cases[f"missing safetensors shards.*{shard}"] = _copy(tiny_dir, tmp_path / "shard", drop=(shard,))
    cases["no tokenizer files"] = _copy(tiny_dir, tmp_path / "notok", drop=("tokenizer.json",))
    for message, path in cases.items():
        with pytest.raises(ValueError, match=message):
            ensure_checkpoint(_local(path), tmp_path / "outputs")


def test_checkpoint_tensor_index(tiny_dir, tiny_model, tmp_path):
    sharded = checkpoint_tensor_index(tiny_dir)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert sharded == index["weight_map"]
    assert all((tiny_dir / f).is_file() for f in sharded.values())

    tiny_model.save_pretrained(tmp_path / "single", max_shard_size="10GB")
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    single = checkpoint_tensor_index(tmp_path / "single")
    assert single == dict.fromkeys(sharded, "model.safetensors")
    with pytest.raises(FileNotFoundError):
        checkpoint_tensor_index(tmp_path)
