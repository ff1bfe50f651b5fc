"""kv_cache=none: keep nothing; every new token reruns the whole sequence through every layer.

AirLLM 2.x behaved this way. Slow by design (a pass costs O(sequence) compute), kept to
measure what a KV cache is worth when weights stream.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedConfig

from strategies.kv_cache.configs import NoKVCacheConfig


class NoKVCache:
    recomputes_sequence = True

    def __init__(self, cfg: NoKVCacheConfig) -> None:
        self.cfg = cfg

    def layers_on_device(self, num_layers: int) -> int:
        return 1  # nothing is kept, but the layer computing holds its whole sequence's K/V while it attends

    def check(self, model_config: PreTrainedConfig) -> None:
        pass

    def held_bytes(self, values: int, positions: int, itemsize: int) -> int:
        return values * positions * itemsize

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        return None
