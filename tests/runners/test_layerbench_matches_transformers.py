"""The streaming runner against transformers' LlamaForCausalLM on the same checkpoint.

Greedy token ids must be identical, and every step's last-position logits within
tolerance (transformers_reference.TOLERANCE, which says why).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers_reference import TOLERANCE, reference_generate

from harness.device import resolve_device
from harness.runners.layerbench.setup import build_setup, generate

NEW_TOKENS = 32
PROMPTS = [
    "The history of computing began with",
    "Once upon a time",
    "1 2 3 4 5",
]
ROPE_LLAMA3 = (
    "+model.config_overrides.rope_scaling={rope_type:llama3,factor:8.0,low_freq_factor:1.0,"
    "high_freq_factor:4.0,original_max_position_embeddings:256}"
)
VARIANTS = {
    "bf16": [],
    "fp32": ["model.dtype=float32"],
    "rope-llama3": [ROPE_LLAMA3],
    "tied": ["+model.config_overrides.tie_word_embeddings=true"],
}


@pytest.mark.parametrize("cache", ["disk", "ram"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runner_matches_transformers(make_cfg, variant: str, cache: str) -> None:
    overrides = [f"cache={cache}", f"workload.max_new_tokens={NEW_TOKENS}", "workload.stop_at_eos=false"]
    cfg = make_cfg(*VARIANTS[variant], *overrides)
    device = resolve_device(cfg.device)
    setup = build_setup(cfg, Path(cfg.paths.outputs), device)
    dtype = setup.model.pipeline.cache.get("embed")["weight"].dtype
    assert dtype == (torch.float32 if variant == "fp32" else torch.bfloat16)

    for prompt in PROMPTS:
        cfg.workload.prompt = prompt
        gen = generate(setup, cfg, keep_logits=True)
        ref_ids, ref_logits = reference_generate(setup.ckpt_dir, gen.prompt_ids, NEW_TOKENS)
        assert gen.generated_ids == ref_ids, f"{variant}/{cache}: tokens differ for prompt {prompt!r}"
        assert len(gen.logits) == len(ref_logits) == NEW_TOKENS
        for step, (ours, ref) in enumerate(zip(gen.logits, ref_logits, strict=True)):
            scale = ref.abs().max().item()
            err = (ours - ref).abs().max().item()
            assert err <= TOLERANCE[dtype] * max(scale, 1.0), f"{variant}/{cache} step {step}: max |diff| {err}"
    assert len(set(gen.generated_ids)) > 1, "degenerate output would make the comparison meaningless"


def test_single_file_local_checkpoint(make_cfg, tmp_path: Path) -> None:
    """model=local on a single-file (unsharded) checkpoint saved by transformers itself."""
    tiny = build_setup(make_cfg(), Path(make_cfg().paths.outputs), torch.device("cpu")).ckpt_dir
    local = tmp_path / "single"
    LlamaForCausalLM.from_pretrained(tiny).save_pretrained(local, max_shard_size="10GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / name).exists():
            (local / name).write_bytes((tiny / name).read_bytes())
    assert (local / "model.safetensors").exists() and not (local / "model.safetensors.index.json").exists()

    cfg = make_cfg("model=local", f"model.path={local}", "workload.max_new_tokens=8", "workload.stop_at_eos=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(setup, cfg)
    ref_ids, _ = reference_generate(local, gen.prompt_ids, 8)
    assert gen.generated_ids == ref_ids


def test_chat_template_prompt(make_cfg) -> None:
    cfg = make_cfg("workload.chat=true", "workload.max_new_tokens=4", "workload.stop_at_eos=false")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    gen = generate(setup, cfg)
    plain = setup.tokenizer(cfg.workload.prompt)["input_ids"]
    assert len(gen.prompt_ids) > len(plain)
    assert "<|start_header_id|>" in setup.tokenizer.decode(gen.prompt_ids)
    ref_ids, _ = reference_generate(setup.ckpt_dir, gen.prompt_ids, 4)
    assert gen.generated_ids == ref_ids


def test_sampling_is_seeded(make_cfg) -> None:
    def tokens(*overrides: str) -> list[int]:
        cfg = make_cfg("workload.do_sample=true", "workload.max_new_tokens=16", "workload.stop_at_eos=false",
                       *overrides)
        return generate(build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu")), cfg).generated_ids

    greedy = tokens("workload.do_sample=false")
    hot = tokens("workload.temperature=3.0", "workload.seed=1")
    assert hot == tokens("workload.temperature=3.0", "workload.seed=1"), "same seed, same tokens"
    assert hot != tokens("workload.temperature=3.0", "workload.seed=2"), "another seed samples otherwise"
    assert hot != greedy
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    assert tokens("workload.top_p=0.0001", "workload.seed=3") == greedy


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_each_units_issue_times_enclose_its_stages_on_the_cpu(make_cfg, prefetch: str) -> None:
    """The host's issue times are stamped around the stages' own stamps; on the CPU (synchronous) they can only be
    the longer. On CUDA they part when the device runs behind the host, which is what the figures are for."""
    cfg = make_cfg("workload.max_new_tokens=3", "workload.stop_at_eos=false", "compression=4bit", "cache=disk",
                   f"prefetch={prefetch}")
    setup = build_setup(cfg, Path(cfg.paths.outputs), torch.device("cpu"))
    rows = generate(setup, cfg).timeline.rows(setup.model.stages)
    computed = [r for r in rows if r["compute_s"] > 0]
    assert {"embed", "rope+mask", "lm_head"} <= {r["unit"] for r in computed}, sorted({r["unit"] for r in computed})
    assert all(r["compute_issue_s"] >= r["compute_s"] for r in computed), computed
    layers = [r for r in rows if r["unit"].startswith("layers.")]
    assert layers and all(r["load_issue_s"] >= r["read_s"] + r["decode_s"] > 0 for r in layers), layers
