"""Every cache x compression x prefetch x kv_cache combination against a transformers reference.

compression=none is compared with LlamaForCausalLM on the checkpoint; 8bit/4bit with
LlamaForCausalLM whose Linear weights were replaced by the same codec's dequantized
weights, so the only difference under test is where and how the codec runs.
"""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, LlamaForCausalLM

import strategies
from harness.measurement.vram import DeviceAllocs
from harness.runners.layerbench.setup import build_setup, generate
from harness.split.layout import unit_of
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig

NEW_TOKENS = 12
PROMPT = "The history of computing began with"
MATRIX = list(
    itertools.product(["disk", "ram"], ["none", "8bit", "4bit"], ["off", "on"], ["none", "device", "offload"])
)
# Same weights and same modules: bf16 rounding differences only (see runners/test_layerbench_matches_transformers).
LOGIT_TOLERANCE = 2e-2


CPU = torch.device("cpu")


def reference_model(
    ckpt: Path, compression: str, compress_embeddings: bool = False, device: torch.device = CPU
) -> LlamaForCausalLM:
    """transformers' model with the weights the runner computes with: encoded on `device`, as the split was
    (bitsandbytes' CPU and CUDA quantizers can round a value to different codes)."""
    model = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    if compression == "none":
        return model
    cfg = {"8bit": Blockwise8bitConfig, "4bit": Blockwise4bitConfig}[compression](
        compress_embeddings=compress_embeddings
    )
    codec = strategies.build(cfg)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        for name, param in model.named_parameters():
            unit, inner = unit_of(name, n)
            decoded = codec.decode(unit, codec.encode(unit, {inner: param.data.to(device, copy=True)}), device)
            param.data.copy_(decoded[inner].cpu())
    return model


@cache
def reference(ckpt: Path, compression: str, prompt_ids: tuple[int, ...]) -> tuple[list[int], list[torch.Tensor]]:
    model = reference_model(ckpt, compression)
    out = model.generate(
        torch.tensor([prompt_ids]),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    return out.sequences[0, len(prompt_ids) :].tolist(), [x.float() for x in out.logits]


@pytest.mark.parametrize(("cache_", "compression", "prefetch", "kv_cache"), MATRIX, ids="-".join)
def test_combination_matches_reference(make_cfg, cache_: str, compression: str, prefetch: str, kv_cache: str) -> None:
    cfg = make_cfg(
        f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}", f"kv_cache={kv_cache}",
        f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false", f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(setup, cfg, keep_logits=True)
    ref_ids, ref_logits = reference(setup.ckpt_dir, compression, tuple(gen.prompt_ids))
    assert gen.generated_ids == ref_ids
    for ours, ref in zip(gen.logits, ref_logits, strict=True):
        assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_compressed_embeddings_match_their_reference(make_cfg, compression: str) -> None:
    cfg = make_cfg(
        f"compression={compression}", "compression.compress_embeddings=true", f"workload.max_new_tokens={NEW_TOKENS}",
        "workload.stop_at_eos=false", f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    assert any(k.endswith(".q") for k in load_file(setup.layout.file("embed"))), "the embedding is compressed"
    gen = generate(setup, cfg)
    model = reference_model(setup.ckpt_dir, compression, compress_embeddings=True)
    out = model.generate(
        torch.tensor([gen.prompt_ids]),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    assert gen.generated_ids == out.sequences[0, len(gen.prompt_ids) :].tolist()


def test_kv_cache_options_give_identical_tokens(make_cfg) -> None:
    tokens = {}
    for kv in ("none", "device", "offload"):
        cfg = make_cfg(f"kv_cache={kv}", "workload.max_new_tokens=24", "workload.stop_at_eos=false")
        tokens[kv] = generate(build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")), cfg).generated_ids
    assert tokens["none"] == tokens["device"] == tokens["offload"]


@pytest.mark.gpu
@pytest.mark.parametrize(("cache_", "compression", "prefetch", "kv_cache"), [
    ("ram", "none", "off", "device"), ("ram", "none", "on", "device"), ("disk", "4bit", "on", "offload"),
    ("ram", "8bit", "off", "none"), ("disk", "none", "off", "device"), ("disk", "8bit", "on", "device"),
], ids="-".join)
def test_combination_on_cuda(make_cfg, cache_: str, compression: str, prefetch: str, kv_cache: str) -> None:
    """The CUDA paths against transformers on the GPU: the plain runner, packed pinned RAM copies, the disk
    cache's page-locked staging slots, the prefetch copy stream, bitsandbytes' CUDA kernels, K/V offload."""
    cfg = make_cfg(
        "device=cuda", f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}",
        f"kv_cache={kv_cache}", f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false",
        f"workload.prompt={PROMPT}",
    )
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cuda"))
    gen = generate(setup, cfg, keep_logits=True)
    model = reference_model(setup.ckpt_dir, compression, device=torch.device("cuda")).cuda()
    out = model.generate(
        torch.tensor([gen.prompt_ids], device="cuda"),
        generation_config=GenerationConfig(
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    assert gen.generated_ids == out.sequences[0, len(gen.prompt_ids) :].tolist()
    for ours, ref in zip(gen.logits, out.logits, strict=True):
        ref = ref.float().cpu()
        assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE * max(ref.abs().max().item(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize(("cache_", "compression", "prefetch"), [
    ("ram", "4bit", "on"), ("ram", "none", "on"), ("disk", "8bit", "off"),
], ids="-".join)
def test_streamed_weights_reuse_device_memory_pass_after_pass(
    make_cfg, cache_: str, compression: str, prefetch: str
) -> None:
    """Weights are not given new device memory each pass: after the prefill pass, the caching allocator hands
    the blocks back, and fewer than one cudaMalloc a token remains (one per layer would be 6 a token here)."""
    cfg = make_cfg(
        "device=cuda", f"cache={cache_}", f"compression={compression}", f"prefetch={prefetch}",
        f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false",
    )
    device = torch.device("cuda")
    setup = build_setup(cfg, Path(cfg.paths.outputs), device)
    allocs = DeviceAllocs(device)
    generate(setup, cfg, on_token=lambda _: allocs.token())
    assert allocs.metrics()["device_allocs_per_token"] < 1, allocs.metrics()
    assert allocs.metrics()["device_alloc_retries_per_token"] == 0, "no cap here: nothing to free and retry"
