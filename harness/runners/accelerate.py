"""runner=accelerate: transformers + accelerate big-model inference, as people run a model bigger than their GPU.

accelerate's `infer_auto_device_map` (what `device_map="auto"` runs) fills the device up to the budget
the VRAM cap leaves; the decoder layers that do not fit are offloaded, to disk (cache=disk: accelerate
reads them from the checkpoint's safetensors in place at each forward) or to host memory (cache=ram),
and its hooks move each one to the device for its forward. On a CPU there is no device memory to fill:
every decoder layer is offloaded, the rest stays in memory.
"""

from __future__ import annotations

import psutil
import torch
from accelerate import infer_auto_device_map, init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

from harness.measurement.vram import GIB, VramCapExceeded, decoder_layer_bytes, model_dtype
from harness.runners.hf import HFRunner, LoadRequest


def offload_device_map(config: LlamaConfig, request: LoadRequest) -> dict[str, str | int]:
    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    # accelerate's device_map value: a cache that rereads the files offloads to disk, one that keeps copies to RAM.
    offload_to = "disk" if request.options["cache"].rereads else "cpu"
    device = request.device
    if device.type != "cuda":
        names = [f"model.{name}" for name, _ in meta.model.named_children() if name != "layers"]
        layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
        return {**dict.fromkeys(names, "cpu"), **dict.fromkeys(layers, offload_to), "lm_head": "cpu"}
    budget = request.vram_budget_bytes
    # An offloaded layer is moved onto the device for its forward: leave room for the largest one.
    dtype = model_dtype(config)
    layer_bytes = decoder_layer_bytes(config)
    if budget is not None:
        budget -= layer_bytes
        if budget <= 0:
            raise VramCapExceeded(
                f"runner=accelerate: vram.cap_gib leaves no room beside one decoder layer "
                f"({layer_bytes / GIB:.2f} GiB) and the KV cache; raise the cap"
            )
    index = device.index or 0
    max_memory = {index: budget or torch.cuda.mem_get_info(index)[0], "cpu": psutil.virtual_memory().available}
    placed = infer_auto_device_map(
        meta, max_memory=max_memory, no_split_module_classes=meta._no_split_modules, dtype=dtype
    )
    return {name: offload_to if where in ("cpu", "disk") else where for name, where in placed.items()}


class AccelerateRunner(HFRunner):
    supports = {
        "decoding": ("greedy",),
        "cache": ("disk", "ram"),
        "compression": ("none",),
        "prefetch": ("off",),  # its hooks load each layer's weights as its forward starts
        "kv_cache": ("device", "none"),
    }

    def load_model(self, request: LoadRequest) -> LlamaForCausalLM:
        config = LlamaConfig.from_pretrained(request.ckpt_dir)
        device_map = offload_device_map(config, request)
        request.work_dir.mkdir(parents=True, exist_ok=True)
        return LlamaForCausalLM.from_pretrained(
            request.ckpt_dir,
            attn_implementation="sdpa",
            device_map=device_map,
            offload_folder=request.work_dir,
        ).eval()
