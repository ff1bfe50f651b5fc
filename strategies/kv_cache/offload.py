"""kv_cache=offload: keys and values live in host memory between passes and travel with their layer.

transformers' own `DynamicCache(offloading=True)` prefetches on CUDA streams and so runs
only on CUDA; this subclass keeps to the Cache API's per-layer `prefetch`/`offload` so the
same code runs on every device: a layer's K/V come to the device when that layer runs and go
back to the host once it has attended.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig

from strategies.kv_cache.configs import OffloadKVCacheConfig


class HostOffloadedCache(DynamicCache):
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx < len(self.layers):
            self.layers[layer_idx].prefetch()
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # The returned device tensors serve this layer's attention; the cache keeps host copies.
        self.layers[layer_idx].offload()
        return keys, values


class OffloadKVCache:
    recomputes_sequence = False

    def __init__(self, cfg: OffloadKVCacheConfig) -> None:
        self.cfg = cfg

    def layers_on_device(self, num_layers: int) -> int:
        return 1  # the layer attending; the others' K/V wait in host memory

    def check(self, model_config: PreTrainedConfig) -> None:
        pass

    def held_bytes(self, values: int, positions: int, itemsize: int) -> int:
        return values * positions * itemsize

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        return HostOffloadedCache(config=model_config)
