"""kv_cache: what the runner keeps of past keys and values between passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from omegaconf import MISSING
from transformers import Cache, PreTrainedConfig


@dataclass
class KVCacheConfig:
    name: str = MISSING
    _target_: str = MISSING


class KVCachePolicy(Protocol):
    def new_cache(self, model_config: PreTrainedConfig, device: torch.device) -> Cache | None:
        """A fresh cache for one generation; None means every pass recomputes the whole sequence."""
        ...
