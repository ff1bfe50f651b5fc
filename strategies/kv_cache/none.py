"""kv_cache=none: keep nothing; every new token reruns the whole sequence through every layer.

AirLLM 2.x behaved this way. Slow by design (a pass costs O(sequence) compute), kept to
measure what a KV cache is worth when weights stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedConfig

from strategies.kv_cache.base import KVCacheConfig


@dataclass
class NoKVCacheConfig(KVCacheConfig):
    name: str = "none"
    _target_: str = "strategies.kv_cache.none.NoKVCache"


class NoKVCache:
    def __init__(self, cfg: NoKVCacheConfig) -> None:
        self.cfg = cfg

    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        return None
