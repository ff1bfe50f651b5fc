"""kv_cache=quantized: transformers' QuantizedCache on the compute device, so a long context fits the cap.

8 bits: the float8 layer (per-tensor scale fixed at the prefill, every new position appended as float8).
4 or 2 bits: optimum-quanto's grouped integers; the newest `residual` positions stay in the model's dtype and
are quantized together once that many have gathered. Each layer's keys and values are its own, so streaming
a layer at a time works as with the plain cache.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedConfig
from transformers.cache_utils import QuantizedCache

from strategies.kv_cache.configs import QuantizedKVCacheConfig


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
            return QuantizedCache(backend="fp8", config=model_config)
        return QuantizedCache(
            backend="quanto", config=model_config, nbits=self.cfg.bits, q_group_size=self.cfg.group_size,
            residual_length=self.cfg.residual,
        )
