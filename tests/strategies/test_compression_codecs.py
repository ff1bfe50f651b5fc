"""compression=8bit|4bit: a split file decodes as in-memory quantization does, through bitsandbytes' own
dequantizers without waiting for the device, and shrinks the layer files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import strategies
from harness.runners.layerbench.setup import build_setup
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig, CompressionConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_split_file_decodes_like_in_memory_quantization(make_cfg, compression: str) -> None:
    cfg = make_cfg(f"compression={compression}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    codec = setup.model.pipeline.codec
    source = LlamaForCausalLM.from_pretrained(setup.ckpt_dir).state_dict()
    for unit in ("layers.00", "layers.01"):
        index = int(unit.split(".")[1])
        prefix = f"model.layers.{index}."
        originals = {k.removeprefix(prefix): v for k, v in source.items() if k.startswith(prefix)}
        from_file = codec.decode(unit, load_file(setup.layout.file(unit)), torch.device("cpu"))
        in_memory = codec.decode(unit, codec.encode(unit, originals), torch.device("cpu"))
        assert from_file.keys() == in_memory.keys() == originals.keys()
        for key in originals:
            assert torch.equal(from_file[key], in_memory[key]), f"{unit}.{key}"
            assert from_file[key].dtype == originals[key].dtype and from_file[key].shape == originals[key].shape
        # Norms are stored as they are; Linear weights are really compressed (and lossy).
        assert torch.equal(from_file["input_layernorm.weight"], originals["input_layernorm.weight"])
        assert not torch.equal(from_file["mlp.up_proj.weight"], originals["mlp.up_proj.weight"])


CODECS = [Blockwise8bitConfig(), Blockwise4bitConfig(), Blockwise4bitConfig(quant_type="fp4", double_quant=True)]


CODEC_IDS = ["8bit", "4bit-nf4", "4bit-fp4-dq"]


def encoded_layer(cfg: CompressionConfig, device: torch.device) -> tuple[object, dict[str, torch.Tensor]]:
    """A codec and a small layer it encoded on `device`, every stored tensor there as after a layer file's copy
    (bitsandbytes leaves its packed records on the host): two Linear weights and a norm."""
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: torch.randn(64, 256, generator=generator).to(torch.bfloat16)
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight")
    }
    weights["input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    codec = strategies.build(cfg)
    stored = codec.encode("layers.00", {k: v.to(device) for k, v in weights.items()})
    return codec, {k: v.to(device) for k, v in stored.items()}


def is_record(key: str) -> bool:
    """The stored tensors that hold a weight's non-tensor state (JSON): ours for 8bit, bitsandbytes' for 4bit."""
    return key.endswith(".qs.meta") or ".qs.quant_state." in key


@pytest.mark.parametrize("cfg", CODECS, ids=CODEC_IDS)
def test_decode_is_bitsandbytes_own_and_reads_each_record_once(cfg: CompressionConfig) -> None:
    import bitsandbytes.functional as bnbf

    codec, stored = encoded_layer(cfg, CPU)
    first = codec.decode("layers.00", dict(stored), CPU)
    for weight in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        codes = stored[weight + ".q"]
        state = {k.removeprefix(weight + ".qs."): v for k, v in stored.items() if k.startswith(weight + ".qs.")}
        if isinstance(cfg, Blockwise4bitConfig):  # bitsandbytes' own unpacking of what as_dict(packed=True) wrote
            expected = bnbf.dequantize_4bit(codes, bnbf.QuantState.from_dict(state, CPU))
        else:
            quant_state = bnbf.QuantState(
                absmax=state["absmax"], code=state["code"], blocksize=cfg.blocksize, dtype=torch.bfloat16
            )
            expected = bnbf.dequantize_blockwise(codes, quant_state)
        assert torch.equal(first[weight], expected), weight
    # Later decodes never read a record (on CUDA each read is a copy to the host that waits for the device): on
    # the meta device they cannot be read at all.
    unreadable = {k: v.to("meta") if is_record(k) else v for k, v in stored.items()}
    assert sum(map(is_record, unreadable)) == 2
    again = codec.decode("layers.00", unreadable, CPU)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CODECS, ids=CODEC_IDS)
def test_decode_on_cuda_issues_its_kernels_without_waiting_for_the_device(cfg: CompressionConfig) -> None:
    """The prefetch worker decodes while the device still copies: a wait in decode serialises the two."""
    cuda = torch.device("cuda")
    codec, stored = encoded_layer(cfg, cuda)
    first = codec.decode("layers.00", dict(stored), cuda)  # reads the records: waits, once per weight and run
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = codec.decode("layers.00", dict(stored), cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_compressed_layer_files_shrink(make_cfg) -> None:
    sizes = {}
    for compression in ("none", "8bit", "4bit"):
        cfg = make_cfg(f"compression={compression}")
        layout = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")).layout
        sizes[compression] = layout.file_bytes("layers.00")
    # bf16 -> int8 + a fp32 scale per 256 -> 4 bit + a fp32 scale per 64 (plus per-tensor state records).
    assert sizes["none"] > sizes["8bit"] > sizes["4bit"]
    assert sizes["8bit"] < 0.6 * sizes["none"] and sizes["4bit"] < 0.4 * sizes["none"]


def test_the_kernels_hub_hint_is_dropped_and_other_warnings_are_not(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import strategies.compression  # noqa: F401  (installs the filter)

    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=bnb_log.name):
        bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "offline")
        bnb_log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
