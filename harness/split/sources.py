"""Where a split's tensors come from: a checkpoint's safetensors files, or the generator of a weightless checkpoint.

The writer (writer.py) asks a source for one unit's tensors at a time, so both kinds share its one code path:
journal, atomic files, manifest, checksums and resume. A generated model too large to write whole
(generated.DIRECT_SPLIT_BYTES) has a weightless checkpoint directory whose `generator.json` says how its weights are
drawn; its source draws each unit's tensors from that recipe, on the generator device, with exactly the values its
written checkpoint would hold, so its split is the one made from such a checkpoint, byte for byte.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from transformers import LlamaConfig

from harness.checkpoints.generated import GENERATOR_FILE, GENERATOR_VERSION, generate_tensor, tensor_specs
from harness.split.integrity import tensor_bytes, tensor_shapes
from harness.split.layout import unit_of
from harness.split.source_check import check_checkpoint_tensors, declared_dtype, expected_tensors


class TensorSource(Protocol):
    # What the source is, for messages: a model's name or a checkpoint's folder.
    name: str
    # Whether the tensors are drawn from a recipe rather than read from files: such a source writes only what a
    # codec compresses (an uncompressed split would be the very checkpoint that is never written).
    generates: bool

    def unit_bytes(self) -> dict[str, int]:
        """Each unit's bytes at the source, in the model's dtype (no weight is read)."""
        ...

    def unit_tensors(self, unit: str) -> dict[str, torch.Tensor]:
        """`unit`'s tensors under the names its transformers module uses (on the host, or on the generator's
        device)."""
        ...

    def close(self) -> None:
        """Release what reading held (open files)."""
        ...


class CheckpointFiles:
    """A checkpoint's safetensors files, checked from their headers when opened
    (source_check.check_checkpoint_tensors)."""

    generates = False

    def __init__(self, ckpt_dir: Path, config: LlamaConfig) -> None:
        self.ckpt_dir = ckpt_dir
        self.name = ckpt_dir.name
        self.num_layers = config.num_hidden_layers
        # Raises ValueError naming what is missing, odd or in another dtype: before the split folder exists.
        self.tensor_files = check_checkpoint_tensors(ckpt_dir, config)
        self.by_unit: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name in sorted(self.tensor_files):
            unit, inner = unit_of(name, self.num_layers)
            self.by_unit[unit].append((name, inner))
        self._handles: dict[str, Any] = {}

    def __str__(self) -> str:
        return str(self.ckpt_dir)

    def unit_bytes(self) -> dict[str, int]:
        sizes: dict[str, int] = defaultdict(int)
        headers = {file: tensor_shapes(self.ckpt_dir / file) for file in set(self.tensor_files.values())}
        for name, file in self.tensor_files.items():
            sizes[unit_of(name, self.num_layers)[0]] += tensor_bytes(*headers[file][name])
        return dict(sizes)

    def unit_tensors(self, unit: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, inner in self.by_unit[unit]:
            file = self.tensor_files[name]
            if file not in self._handles:
                self._handles[file] = safe_open(self.ckpt_dir / file, framework="pt")
            tensors[inner] = self._handles[file].get_tensor(name)
        return tensors

    def close(self) -> None:
        self._handles.clear()


def read_recipe(ckpt_dir: Path) -> dict[str, Any] | None:
    """A weightless checkpoint's generator recipe; None for a checkpoint with weight files."""
    path = ckpt_dir / GENERATOR_FILE
    if not path.is_file():
        return None
    recipe = json.loads(path.read_text())
    if recipe.get("generator") != GENERATOR_VERSION:
        raise ValueError(
            f"{path} was written by generator version {recipe.get('generator')!r}, not this harness's "
            f"{GENERATOR_VERSION!r}: its splits would hold other values; delete {ckpt_dir} to have it rebuilt"
        )
    return recipe


class GeneratedTensors:
    """The weights of a weightless generated checkpoint, drawn unit by unit from its recipe (GENERATOR_FILE):
    the values `build_generated_checkpoint` would have written, on the recipe's generator device."""

    generates = True

    def __init__(self, ckpt_dir: Path, config: LlamaConfig, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.name = str(recipe.get("model", ckpt_dir.name))
        self.num_layers = config.num_hidden_layers
        self.dtype = getattr(torch, recipe["dtype"])
        if declared_dtype(config) not in (None, recipe["dtype"]):
            raise ValueError(
                f"checkpoint {ckpt_dir}: config.json declares dtype {declared_dtype(config)}, but its "
                f"{GENERATOR_FILE} generates {recipe['dtype']}: delete the directory to have it rebuilt"
            )
        self.device = torch.device(recipe["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"model {self.name} draws its weights on cuda (model.generator_device=cuda), but torch sees no CUDA "
                "device here: run it on a GPU machine, or set model.generator_device=cpu (other values: a model of "
                "its own, drawn and encoded far more slowly)"
            )
        specs = {name: (tuple(shape), kind) for name, shape, kind in tensor_specs(config)}
        expected = expected_tensors(config)
        if {n: s for n, (s, _) in specs.items()} != expected:
            differ = sorted(set(specs) ^ set(expected)) or [n for n in expected if specs[n][0] != expected[n]]
            raise ValueError(f"the generator's tensors are not the model's for {ckpt_dir}/config.json: {differ[:5]}")
        self.by_unit: dict[str, list[tuple[str, str, tuple[int, ...], str]]] = defaultdict(list)
        for name, (shape, kind) in specs.items():
            unit, inner = unit_of(name, self.num_layers)
            self.by_unit[unit].append((name, inner, shape, kind))

    def __str__(self) -> str:
        return f"the generator of {self.name} (seed {self.recipe['seed']}, on {self.device.type})"

    def unit_bytes(self) -> dict[str, int]:
        itemsize = self.dtype.itemsize
        return {
            unit: sum(torch.Size(shape).numel() * itemsize for _, _, shape, _ in specs)
            for unit, specs in self.by_unit.items()
        }

    def unit_tensors(self, unit: str) -> dict[str, torch.Tensor]:
        r = self.recipe
        return {
            inner: generate_tensor(
                r["seed"], name, shape, kind, self.dtype, r["live_rows"], self.device,
                to_host=self.device.type == "cpu",
            )
            for name, inner, shape, kind in sorted(self.by_unit[unit])
        }

    def close(self) -> None:
        pass


def open_source(ckpt_dir: Path, config: LlamaConfig) -> TensorSource:
    """The tensor source of `ckpt_dir`, checked: its generator when it is a weightless generated checkpoint, else
    its safetensors files. Raises ValueError naming what is wrong, before anything is written."""
    recipe = read_recipe(ckpt_dir)
    return CheckpointFiles(ckpt_dir, config) if recipe is None else GeneratedTensors(ckpt_dir, config, recipe)
