"""runner=airllm: AirLLM 4.0 (the write-up's tool), an optional extra.

AirLLM writes its own per-layer split beside ours (under outputs/peers/airllm/), reads each layer
from it on every pass, and runs transformers' own forward and generate through hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.config import Config, RunnerUnavailable
from harness.runners.hf import HFRunner, LoadRequest


class AirLLMRunner(HFRunner):
    supports = {
        "decoding": ("greedy",),
        "cache": ("disk",),
        "compression": ("none", "8bit", "4bit"),
        "prefetch": ("on", "off"),  # AirLLM prefetches by default (and never while it decompresses)
        "kv_cache": ("device", "none"),
    }
    requires = ("airllm",)
    extra = "airllm"

    @classmethod
    def check(cls, cfg: Config, explicit: set[str]) -> dict[str, Any]:
        """As every runner's, and refused on a CPU when compressing: AirLLM quantizes each layer on the GPU
        (bitsandbytes on `.cuda()` tensors), so a compressed split cannot even be written there."""
        options = super().check(cfg, explicit)
        on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if options["compression"].bits is not None and not on_cuda:
            raise RunnerUnavailable(
                f"runner=airllm compresses on CUDA only: compression={options['compression'].name} needs a CUDA "
                "device; on a CPU run it with compression=none"
            )
        return options

    def load_model(self, request: LoadRequest) -> Any:
        from airllm import AutoModel

        bits = request.options["compression"].bits
        device = request.device
        air = AutoModel.from_pretrained(
            str(request.ckpt_dir),
            device=f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu",
            layer_shards_saving_path=str(request.work_dir),
            compression=None if bits is None else f"{bits}bit",
            prefetching=request.options["prefetch"].layers_ahead > 0,
        )
        # The wrapper only forwards generate() to its transformers model; its hooks keep the wrapper alive.
        return air.model
