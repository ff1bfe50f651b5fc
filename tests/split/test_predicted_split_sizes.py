"""harness.split.sizes: a split's files predicted from the geometry and the codec equal the real split's, byte for
byte (header included), on the tiny and the 1B geometries; with double_quant within its stated slack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import harness.checkpoints.generated as generated
import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.loading import load_model_config
from harness.config import ModelConfig
from harness.split.sizes import DOUBLE_QUANT_SLACK, predicted_files, predicted_manifest, safetensors_bytes
from harness.split.writer import ensure_split
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig, NoCompressionConfig

EXACT = {
    "none": NoCompressionConfig(),
    "8bit": Blockwise8bitConfig(),
    "4bit": Blockwise4bitConfig(),
    "4bit-fp4-b128-emb": Blockwise4bitConfig(quant_type="fp4", blocksize=128, compress_embeddings=True),
    "8bit-b1024-emb": Blockwise8bitConfig(blocksize=1024, compress_embeddings=True),
}


def test_safetensors_file_size_is_predicted_exactly() -> None:
    tensors = {
        "b.q": torch.zeros(7, 1, dtype=torch.uint8), "a.weight": torch.zeros(3, 5, dtype=torch.bfloat16),
        "a.qs.absmax": torch.zeros(4), "z": torch.zeros(2, dtype=torch.float16), "a": torch.zeros(9),
        "m": torch.zeros(1001, dtype=torch.uint8),
    }
    stored = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    assert safetensors_bytes(stored, {"format": "pt"}) == len(save(tensors, metadata={"format": "pt"}))
    assert safetensors_bytes(stored) == len(save(tensors))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_tiny_split_files_are_predicted_exactly(name: str, tied: bool, tmp_path: Path) -> None:
    model = ModelConfig(name="tiny", geometry="tiny", config_overrides={"tie_word_embeddings": tied})
    ckpt = ensure_checkpoint(model, tmp_path)
    config = load_model_config(ckpt)
    codec = strategies.build(EXACT[name])
    layout, _ = ensure_split(ckpt, config, codec, tmp_path / "splits")
    predicted = predicted_manifest(config, codec)
    assert predicted["aliases"] == layout.manifest["aliases"]
    real = layout.manifest["files"]
    assert {u: r["bytes"] for u, r in predicted["files"].items()} == {u: r["bytes"] for u, r in real.items()}
    assert {u: r["tensors"] for u, r in predicted["files"].items()} == {u: r["tensors"] for u, r in real.items()}


def test_double_quant_files_are_predicted_within_the_slack(ckpt: Path, tmp_path: Path) -> None:
    """Its record prints the mean absmax, whose length depends on the weights."""
    config = load_model_config(ckpt)
    codec = strategies.build(Blockwise4bitConfig(double_quant=True))
    layout, _ = ensure_split(ckpt, config, codec, tmp_path)
    predicted = predicted_files(config, codec)
    for unit, record in layout.manifest["files"].items():
        weights = sum(name.endswith(".q") for name in record["tensors"])
        assert abs(predicted[unit]["bytes"] - record["bytes"]) <= DOUBLE_QUANT_SLACK * weights + 8, unit
        assert predicted[unit]["tensors"].keys() == record["tensors"].keys(), unit


@pytest.mark.parametrize("name", ["4bit", "8bit"])
def test_1b_split_files_are_predicted_exactly(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1B geometry (tied 128256-row embedding, its decoder layer's shapes) with one decoder layer, its split
    drawn straight from the seed so that no 0.6 GB checkpoint is written first."""
    monkeypatch.setattr(generated, "DIRECT_SPLIT_BYTES", 0)
    model = ModelConfig(name="1b", geometry="llama3.2-1b", config_overrides={"num_hidden_layers": 1})
    ckpt = ensure_checkpoint(model, tmp_path)
    config = load_model_config(ckpt)
    codec = strategies.build(EXACT[name])
    layout, _ = ensure_split(ckpt, config, codec, tmp_path / "splits")
    predicted = predicted_files(config, codec)
    real = layout.manifest["files"]
    assert set(real) == {"embed", "layers.00", "norm"}, "tied: lm_head reads embed's file"
    assert {u: r["bytes"] for u, r in predicted.items()} == {u: r["bytes"] for u, r in real.items()}
    assert {u: r["tensors"] for u, r in predicted.items()} == {u: r["tensors"] for u, r in real.items()}
    assert all(r["bytes"] == (layout.dir / r["file"]).stat().st_size for r in real.values())
