"""runner=transformers: LlamaForCausalLM with every weight in device memory, the ceiling when it fits."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaForCausalLM

from harness.measurement.vram import GIB, VramCapExceeded
from harness.runners.hf import HFRunner, LoadRequest


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """The weights as stored: the safetensors files (their headers are a few KB)."""
    return sum(path.stat().st_size for path in ckpt_dir.glob("*.safetensors"))


class TransformersRunner(HFRunner):
    supports = {"decoding": ("greedy",), "compression": ("none",), "kv_cache": ("device", "none")}

    def load_model(self, request: LoadRequest) -> LlamaForCausalLM:
        need = checkpoint_bytes(request.ckpt_dir)
        if request.vram_budget_bytes is not None and need > request.vram_budget_bytes:
            raise VramCapExceeded(
                f"runner=transformers holds the whole model on the device: its weights take {need / GIB:.2f} GiB, "
                f"over the {request.vram_budget_bytes / GIB:.2f} GiB that vram.cap_gib leaves for weights; "
                "use runner=accelerate or runner=layerbench, or a larger vram.cap_gib"
            )
        # Loaded, then moved, as the in-memory reference is: loading with device_map={"": device} dispatches
        # through accelerate's hooks, which slows decoding (docs/findings.md).
        model = LlamaForCausalLM.from_pretrained(request.ckpt_dir, attn_implementation="sdpa")
        return model.to(request.device).eval()
