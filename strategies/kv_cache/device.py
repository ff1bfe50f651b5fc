"""kv_cache=device: transformers' DynamicCache, keys and values kept on the compute device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig

from strategies.kv_cache.base import KVCacheConfig


@dataclass
class DeviceKVCacheConfig(KVCacheConfig):
    name: str = "device"
    _target_: str = "strategies.kv_cache.device.DeviceKVCache"


class DeviceKVCache:
    def __init__(self, cfg: DeviceKVCacheConfig) -> None:
        self.cfg = cfg

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        return DynamicCache(config=model_config)
