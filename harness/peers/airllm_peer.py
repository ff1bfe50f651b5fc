"""runner=airllm: AirLLM 4.0 (the write-up's tool), an optional extra.

AirLLM writes its own per-layer split beside ours (under outputs/peers/airllm/), reads each layer
from it on every pass, and runs transformers' own forward and generate through hooks.
"""

from __future__ import annotations

from typing import Any

from harness.peers.base import LoadRequest


class AirLLMPeer:
    def load(self, request: LoadRequest) -> Any:
        from airllm import AutoModel

        compression = request.choices["compression"]
        device = request.device
        air = AutoModel.from_pretrained(
            str(request.ckpt_dir),
            device=f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu",
            layer_shards_saving_path=str(request.work_dir),
            compression=None if compression == "none" else compression,
            prefetching=request.choices["prefetch"] == "on",
        )
        # The wrapper only forwards generate() to its transformers model; its hooks keep the wrapper alive.
        return air.model
