"""A model too large to write whole is generated straight into its compressed splits (harness.split.sources): the
split equals, byte for byte, the one made from the same seeded checkpoint written out; an interrupted direct split
resumes to the same bytes; its manifest validates and is reused without drawing a weight; one unit is held at a time;
an uncompressed split, or a generator on a GPU that is not there, is refused with the reason."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from split_files import codec, tree
from transformers import LlamaConfig

import harness.checkpoints.generated as generated
import harness.split.sources as sources_mod
from harness.checkpoints.generated import GENERATOR_FILE, ensure_checkpoint
from harness.checkpoints.loading import load_model_config
from harness.config import ModelConfig
from harness.split.layout import MANIFEST, unit_names
from harness.split.manifest import read_manifest
from harness.split.sources import GeneratedTensors
from harness.split.writer import ensure_split
from strategies.compression.blockwise_4bit import Blockwise4bit
from strategies.compression.blockwise_8bit import Blockwise8bit
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig

TINY = ModelConfig(name="tiny", geometry="tiny")


class Interrupt(BaseException):
    """Stands in for a kill mid-split: not an Exception, so nothing may swallow it."""

CODECS = {
    "4bit": lambda: Blockwise4bit(Blockwise4bitConfig()),
    "8bit": lambda: Blockwise8bit(Blockwise8bitConfig()),
}


@pytest.fixture()
def weightless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny model as the 70B is built: a checkpoint directory with no weights, its splits drawn from the seed."""
    monkeypatch.setattr(generated, "DIRECT_SPLIT_BYTES", 0)
    return ensure_checkpoint(TINY, tmp_path / "outputs")


def files_of(split_root: Path) -> dict[str, bytes]:
    """The split's files by name, without the manifest (whose source fingerprint names the checkpoint)."""
    return {Path(k).name: v for k, v in tree(split_root).items() if not k.endswith((MANIFEST, ".lock"))}


def test_a_weightless_checkpoint_holds_everything_but_the_weights(weightless: Path, ckpt: Path) -> None:
    assert weightless.name != ckpt.name, "another directory than the written checkpoint's"
    assert not list(weightless.glob("*.safetensors*"))
    assert {p.name for p in ckpt.iterdir()} - {p.name for p in weightless.iterdir()} == {
        p.name for p in ckpt.glob("*.safetensors*")
    }
    recipe = json.loads((weightless / GENERATOR_FILE).read_text())
    assert (recipe["seed"], recipe["dtype"], recipe["device"], recipe["model"]) == (0, "bfloat16", "cpu", "tiny")
    assert load_model_config(weightless).to_dict() == load_model_config(ckpt).to_dict()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_direct_split_equals_the_split_of_the_written_checkpoint(
    name: str, weightless: Path, ckpt: Path, config: LlamaConfig, tmp_path: Path
) -> None:
    ordinary, _ = ensure_split(ckpt, config, CODECS[name](), tmp_path / "ordinary")
    direct, stats = ensure_split(weightless, load_model_config(weightless), CODECS[name](), tmp_path / "direct")
    assert stats.files_written == config.num_hidden_layers + 3
    assert files_of(tmp_path / "direct") == files_of(tmp_path / "ordinary")
    differs = {k for k in ordinary.manifest if ordinary.manifest[k] != direct.manifest[k]}
    assert differs == {"source_fingerprint"}, "the same files, from another source"
    assert read_manifest(direct.dir / MANIFEST) == direct.manifest, "the manifest validates"


def test_interrupted_direct_split_resumes_byte_identical(
    weightless: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_model_config(weightless)
    ensure_split(weightless, config, CODECS["4bit"](), tmp_path / "whole")
    real = GeneratedTensors.unit_tensors
    drawn: list[str] = []

    def draw_then_die(self: GeneratedTensors, unit: str) -> dict[str, torch.Tensor]:
        if len(drawn) == 3:
            raise Interrupt()
        drawn.append(unit)
        return real(self, unit)

    monkeypatch.setattr(GeneratedTensors, "unit_tensors", draw_then_die)
    with pytest.raises(Interrupt):
        ensure_split(weightless, config, CODECS["4bit"](), tmp_path / "resumed")
    monkeypatch.setattr(GeneratedTensors, "unit_tensors", real)
    (split_dir,) = [p.parent for p in (tmp_path / "resumed").rglob("journal.jsonl")]
    assert not (split_dir / MANIFEST).exists() and len(list(split_dir.glob("*.safetensors"))) == 3

    _, stats = ensure_split(weightless, config, CODECS["4bit"](), tmp_path / "resumed")
    assert stats.files_written == config.num_hidden_layers + 3 - 3, "only the missing units are drawn"
    assert tree(tmp_path / "resumed") == tree(tmp_path / "whole")


def test_a_direct_split_is_reused_without_drawing_a_weight(
    weightless: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_model_config(weightless)
    first, _ = ensure_split(weightless, config, CODECS["8bit"](), tmp_path)

    def no_draw(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was drawn for a split that exists")

    monkeypatch.setattr(sources_mod, "generate_tensor", no_draw)
    layout, stats = ensure_split(weightless, config, CODECS["8bit"](), tmp_path, verify=True)
    assert not stats.fresh and layout.manifest == first.manifest


def test_one_unit_is_held_at_a_time(weightless: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 70B geometry is 141 GB in bf16: each unit's tensors are gone before the next unit is drawn."""
    config = load_model_config(weightless)
    real = GeneratedTensors.unit_tensors
    alive: list[weakref.ref] = []
    order: list[str] = []

    def watched(self: GeneratedTensors, unit: str) -> dict[str, torch.Tensor]:
        assert all(ref() is None for ref in alive), f"a unit drawn before {unit} is still held"
        tensors = real(self, unit)
        alive[:] = [weakref.ref(t) for t in tensors.values()]
        order.append(unit)
        return tensors

    monkeypatch.setattr(GeneratedTensors, "unit_tensors", watched)
    ensure_split(weightless, config, CODECS["4bit"](), tmp_path)
    assert order == unit_names(config.num_hidden_layers)


def test_an_uncompressed_direct_split_is_refused_with_the_numbers(weightless: Path, tmp_path: Path) -> None:
    config = load_model_config(weightless)
    total = generated.weights_bytes(config) / 1e9
    numbers = rf"its {total:.1f} GB of bfloat16 weights .* compression=4bit \(a \d+\.\d GB split"
    with pytest.raises(ValueError, match=numbers):
        ensure_split(weightless, config, codec(), tmp_path / "splits")
    assert not (tmp_path / "splits").exists(), "nothing is written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_a_generator_on_a_missing_gpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generated, "DIRECT_SPLIT_BYTES", 0)
    on_gpu = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny", generator_device="cuda"), tmp_path)
    with pytest.raises(ValueError, match=r"draws its weights on cuda .* torch sees no CUDA device"):
        ensure_split(on_gpu, load_model_config(on_gpu), CODECS["4bit"](), tmp_path / "splits")
