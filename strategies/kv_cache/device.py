"""kv_cache=device: transformers' DynamicCache, keys and values kept on the compute device."""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig

from strategies.kv_cache.configs import DeviceKVCacheConfig


class DeviceKVCache:
    recomputes_sequence = False

    def __init__(self, cfg: DeviceKVCacheConfig) -> None:
        self.cfg = cfg

    def layers_on_device(self, num_layers: int) -> int:
        return num_layers

    def check(self, model_config: PreTrainedConfig) -> None:
        pass

    def held_bytes(self, values: int, positions: int, itemsize: int) -> int:
        return values * positions * itemsize

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        return DynamicCache(config=model_config)
