"""kv_cache=quantized: transformers' QuantizedCache on the compute device, so a long context fits the cap.

8 bits: the float8 layer (per-tensor scale fixed at the prefill, every new position appended as float8).
4 or 2 bits: optimum-quanto's grouped integers; the newest `residual` positions stay in the model's dtype and
are quantized together once that many have gathered. Each layer's keys and values are its own, so streaming
a layer at a time works as with the plain cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, PreTrainedConfig
from transformers.cache_utils import Fp8QuantizedLayer, QuantizedCache

from strategies.kv_cache.configs import QuantizedKVCacheConfig


class CroppableQuantizedCache(QuantizedCache):
    """transformers' QuantizedCache that can cut positions off its end, as speculative decoding does with rejected
    draft tokens (the library's own crop assumes plain tensors)."""

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                _crop_layer(layer, max_length if max_length >= 0 else layer.get_seq_length() + max_length)


def _crop_layer(layer: Any, keep: int) -> None:
    """Keep a quantized layer's first `keep` positions. float8 positions are quantized one by one (a fixed scale), so
    they are cut as they are; grouped integers are cut from the unquantized residual window when the dropped
    positions are all there, else the positions kept are requantized together, as an overflow of the window does."""
    drop = layer.cumulative_length - keep
    if drop <= 0:
        return
    if isinstance(layer, Fp8QuantizedLayer):
        layer._quantized_keys = (layer._quantized_keys[0][..., :keep, :], layer._quantized_keys[1])
        layer._quantized_values = (layer._quantized_values[0][..., :keep, :], layer._quantized_values[1])
    else:
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        if drop <= residual:
            layer.keys = layer.keys[..., : residual - drop, :]
            layer.values = layer.values[..., : residual - drop, :]
        else:
            keys, values = layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)
            if residual:
                keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
            layer._quantized_keys = layer._quantize(keys[..., :keep, :].contiguous(), axis=layer.axis_key)
            layer._quantized_values = layer._quantize(values[..., :keep, :].contiguous(), axis=layer.axis_value)
            layer.keys = torch.tensor([], dtype=keys.dtype, device=keys.device)
            layer.values = torch.tensor([], dtype=keys.dtype, device=keys.device)
    layer.cumulative_length = keep


class QuantizedKVCache:
    recomputes_sequence = False

    def __init__(self, cfg: QuantizedKVCacheConfig) -> None:
        self.cfg = cfg

    def layers_on_device(self, num_layers: int) -> int:
        return num_layers

    def held_bytes(self, values: int, positions: int, itemsize: int) -> int:
        if self.cfg.bits == 8:
            return values * positions + 2 * 4  # one byte a value, and a float32 scale for the keys and the values
        plain = min(positions, self.cfg.residual)
        # Each group of group_size values: its codes, and a scale and a zero point in the model's dtype.
        per_value = self.cfg.bits / 8 + 2 * itemsize / self.cfg.group_size
        return int(values * (plain * itemsize + (positions - plain) * per_value))

    def check(self, model_config: PreTrainedConfig) -> None:
        """Refuse a group size the model's head dimension cannot be cut into, before any weight is read."""
        config = model_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.cfg.bits != 8 and head_dim % self.cfg.group_size:
            raise ValueError(
                f"kv_cache.group_size={self.cfg.group_size} does not divide the model's head_dim of {head_dim}: "
                f"choose a divisor of {head_dim} (e.g. kv_cache.group_size={min(head_dim, 32)})"
            )

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        self.check(model_config)
        if self.cfg.bits == 8:
            return CroppableQuantizedCache(backend="fp8", config=model_config)
        return CroppableQuantizedCache(
            backend="quanto", config=model_config, nbits=self.cfg.bits, q_group_size=self.cfg.group_size,
            residual_length=self.cfg.residual,
        )
