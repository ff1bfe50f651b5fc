"""residency=auto: keep as many units on the device as the budget holds, in their stored form.

Decoder layers first (each saves a layer's read and copy on every pass), placed as configured;
once every layer fits, the final norm, lm_head and the embeddings, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from strategies.residency.configs import AutoResidencyConfig

GIB = 1 << 30


def placed(layers: Sequence[str], count: int, placement: str) -> list[str]:
    """`count` of `layers`: the first, the last, or spread evenly (both ends included when count > 1)."""
    if count <= 0:
        return []
    if placement == "first":
        return list(layers[:count])
    if placement == "last":
        return list(layers[len(layers) - count:])
    if count == 1:
        return [layers[len(layers) // 2]]
    step = (len(layers) - 1) / (count - 1)
    return [layers[round(i * step)] for i in range(count)]


class AutoResidency:
    active = True

    def __init__(self, cfg: AutoResidencyConfig) -> None:
        self.cfg = cfg

    def choose(self, layers: Sequence[str], others: Sequence[str], unit_bytes: Mapping[str, int],
               budget_bytes: int) -> list[str]:
        layer_bytes = max((unit_bytes[name] for name in layers), default=0)
        if self.cfg.layers is not None:
            if self.cfg.layers > len(layers):
                raise ValueError(
                    f"residency.layers={self.cfg.layers} is more than the model's {len(layers)} decoder layers"
                )
            chosen = placed(layers, self.cfg.layers, self.cfg.placement)
            need = sum(unit_bytes[name] for name in chosen)
            if need > budget_bytes:
                fits = max(budget_bytes, 0) // layer_bytes if layer_bytes else 0
                raise ValueError(
                    f"residency.layers={self.cfg.layers} needs {need / GIB:.2f} GiB on the device, but "
                    f"{max(budget_bytes, 0) / GIB:.2f} GiB is left beside streaming, the KV cache and activations "
                    f"under vram.cap_gib: use residency.layers<={fits}, residency.layers=null (as many as fit), "
                    "compression=8bit/4bit, or a larger cap"
                )
            return chosen
        # Layers are alike in size: the count that fits, then the units beyond them while room is left.
        count = min(len(layers), max(budget_bytes, 0) // layer_bytes) if layer_bytes else len(layers)
        chosen = placed(layers, count, self.cfg.placement)
        left = budget_bytes - sum(unit_bytes[name] for name in chosen)
        if count == len(layers):
            for name in others:
                if unit_bytes[name] <= left:
                    chosen.append(name)
                    left -= unit_bytes[name]
        return chosen
