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
