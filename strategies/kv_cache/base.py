"""kv_cache: what the runner keeps of past keys and values between passes."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import Cache, PreTrainedConfig


class KVCachePolicy(Protocol):
    # Every pass runs the whole sequence through every layer (no cache): a pass's compute grows with it.
    recomputes_sequence: bool

    def layers_on_device(self, num_layers: int) -> int:
        """How many layers' keys and values are on the device at once, at the most."""
        ...

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        """A fresh cache for one generation; None means every pass recomputes the whole sequence."""
        ...

    def check(self, model_config: PreTrainedConfig) -> None:
        """Refuse a model this policy cannot cache, before any weight is read (a no-op for most)."""
        ...

    def held_bytes(self, values: int, positions: int, itemsize: int) -> int:
        """Bytes one layer's cache holds for `positions` positions of `values` values each (keys and values
        together), `itemsize` bytes a value in the model's dtype: what the VRAM estimate counts."""
        ...


def cache_bytes(cache: Cache | None) -> int:
    """The bytes a cache holds: every layer's keys and values, quantized ones included (their codes, scales and
    zero points), wherever they lie; 0 for no cache."""
    if cache is None:
        return 0
    return sum(_tensor_bytes(vars(layer)) for layer in cache.layers)


def _tensor_bytes(value: object) -> int:
    """The bytes of the tensors in `value`: a tensor, a tensor subclass made of tensors (a quantized one), or a
    tuple, list or dict of them."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
            names, _ = value.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(value, name)) for name in names)
        return value.nbytes
    if isinstance(value, tuple | list):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0
