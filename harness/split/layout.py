"""A split's layout: the layer units in execution order, and where each unit's file is.

Layer units, in execution order: ``embed``, ``layers.00`` .. ``layers.NN``, ``norm``,
``lm_head`` (absent as a file when the embeddings are tied: lm_head then reads
``embed``'s file). Each file holds the unit's tensors under the names its transformers
module uses (``self_attn.q_proj.weight``, ``weight``), as the compression codec encoded them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def unit_names(num_layers: int) -> list[str]:
    """Execution order of the layer units."""
    width = max(2, len(str(num_layers - 1)))
    return ["embed", *(f"layers.{i:0{width}d}" for i in range(num_layers)), "norm", "lm_head"]


def unit_of(tensor_name: str, num_layers: int) -> tuple[str, str]:
    """Checkpoint tensor name -> (unit, name inside the unit's module)."""
    units = unit_names(num_layers)
    if tensor_name.startswith("model.layers."):
        index, _, rest = tensor_name.removeprefix("model.layers.").partition(".")
        return units[1 + int(index)], rest
    prefixes = {"model.embed_tokens.": "embed", "model.norm.": "norm", "lm_head.": "lm_head"}
    for prefix, unit in prefixes.items():
        if tensor_name.startswith(prefix):
            return unit, tensor_name.removeprefix(prefix)
    raise ValueError(f"checkpoint tensor {tensor_name!r} belongs to no Llama layer; is this a Llama checkpoint?")


@dataclass
class SplitLayout:
    """A finished split: where each unit's file is, and what the manifest says of it (strategies' LayerFiles)."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def units(self) -> list[str]:
        return unit_names(self.manifest["num_hidden_layers"])

    def record(self, unit: str) -> dict[str, Any]:
        files = self.manifest["files"]
        return files[unit] if unit in files else files[self.manifest["aliases"][unit]]

    def file(self, unit: str) -> Path:
        return self.dir / self.record(unit)["file"]

    def file_bytes(self, unit: str) -> int:
        return self.record(unit)["bytes"]

    def files_bytes(self, units: list[str]) -> int:
        """The bytes of the files these units read, each file once (a tied lm_head reads embed's)."""
        return sum({self.file(u): self.file_bytes(u) for u in units}.values())

    def readers(self, unit: str) -> int:
        return self._readers_by_file[self.record(unit)["file"]]

    @cached_property
    def _readers_by_file(self) -> Counter[str]:
        # Asked per layer per pass by the disk cache: counted once, from the manifest, which does not change.
        return Counter(self.record(u)["file"] for u in self.units)
