"""harness.checkpoints.generated: a geometry becomes a LlamaConfig, and a generated checkpoint is built once,
byte-identical, sharded by size, whole or not at all, and loads and decodes in transformers (CPU, fast)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from harness.checkpoints import generated as models
from harness.checkpoints.generated import build_generated_checkpoint, ensure_checkpoint, llama_config_for, load_geometry
from harness.checkpoints.local import checkpoint_tensor_index
from harness.checkpoints.tokenizer import BOS, CORPUS_PATH, END_OF_TEXT, EOT
from harness.config import ModelConfig

TINY = ModelConfig(name="tiny", geometry="tiny")


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def load_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, file_name in checkpoint_tensor_index(ckpt_dir).items():
        with safe_open(str(ckpt_dir / file_name), framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def test_load_geometry_lists_available_names():
    assert load_geometry("tiny")["hidden_size"] == 128
    with pytest.raises(ValueError, match=r"llama3-70b.*llama3-8b.*llama3.2-1b.*tiny"):
        load_geometry("llama3-405b")


def test_llama_config_for_real_geometries(tokenizer):
    c8 = llama_config_for(ModelConfig(name="8b", geometry="llama3-8b"), len(tokenizer))
    assert (c8.hidden_size, c8.num_hidden_layers, c8.num_attention_heads, c8.num_key_value_heads) == (
        4096,
        32,
        32,
        8,
    )
    assert (c8.vocab_size, c8.intermediate_size, c8.tie_word_embeddings) == (128256, 14336, False)
    assert c8.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert c8.dtype == torch.bfloat16
    assert (c8.bos_token_id, c8.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)

    c1 = llama_config_for(ModelConfig(name="1b", geometry="llama3.2-1b"), len(tokenizer))
    assert (c1.hidden_size, c1.num_hidden_layers, c1.num_key_value_heads, c1.head_dim) == (2048, 16, 8, 64)
    assert c1.tie_word_embeddings and c1.vocab_size == 128256
    assert c1.rope_parameters["rope_type"] == "llama3" and c1.rope_parameters["factor"] == 32.0
    assert c1.rope_parameters["rope_theta"] == 500000.0
    # the geometry's dict must not be shared with (and mutated by) the config
    assert "rope_theta" not in load_geometry("llama3.2-1b")["rope_scaling"]


def test_llama_config_for_overrides(tokenizer):
    tiny = llama_config_for(TINY, len(tokenizer))
    assert tiny.vocab_size == len(tokenizer) and tiny.dtype == torch.bfloat16
    # Hydra hands overrides over as a DictConfig
    overrides = OmegaConf.create({"num_hidden_layers": 2, "rope_theta": 10000.0, "rope_scaling": LLAMA3_ROPE})
    cfg = llama_config_for(
        ModelConfig(name="8b", geometry="llama3-8b", dtype="float16", config_overrides=overrides),
        len(tokenizer),
    )
    assert cfg.num_hidden_layers == 2 and cfg.dtype == torch.float16
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 10000.0
    no_scaling = ModelConfig(name="1b", geometry="llama3.2-1b", config_overrides={"rope_scaling": None})
    assert llama_config_for(no_scaling, len(tokenizer)).rope_parameters["rope_type"] == "default"
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        llama_config_for(ModelConfig(name="t", geometry="tiny", config_overrides={"vocab_size": 100}), 1024)


def test_tiny_checkpoint_files(tiny_dir, tokenizer):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    } <= names
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = 0
    for file_name in shard_files:
        with safe_open(str(tiny_dir / file_name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert generation.do_sample is False
    assert set(generation.eos_token_id) >= {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(END_OF_TEXT),
    }


def test_tiny_checkpoint_loads_in_transformers(tiny_dir, tiny_model, tokenizer):
    model, info = LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(checkpoint_tensor_index(tiny_dir)) == set(model.state_dict())
    config = model.config
    assert model.dtype == torch.bfloat16
    assert config.num_key_value_heads < config.num_attention_heads, "GQA"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert not config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    loaded = AutoTokenizer.from_pretrained(tiny_dir)
    text = CORPUS_PATH.read_text()[:1000]
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert (loaded.bos_token, loaded.eos_token, loaded.chat_template) == (BOS, EOT, tokenizer.chat_template)


def test_checkpoint_is_reused_not_rebuilt(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="harness.checkpoints.generated")
    first = ensure_checkpoint(TINY, tmp_path)
    assert "building generated checkpoint" in caplog.text
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt an existing checkpoint")

    monkeypatch.setattr(models, "build_generated_checkpoint", no_rebuild)
    assert ensure_checkpoint(TINY, tmp_path) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name != f".{first.name}.lock"]
    assert leftovers == [first.name], "no temporary leftovers"
    monkeypatch.undo()
    # another recipe is another directory
    other = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny", seed=1), tmp_path)
    assert other != first


def test_jobs_needing_one_checkpoint_at_once_build_it_once(tmp_path, monkeypatch):
    """A parallel sweep's jobs all miss the same generated model: one builds it, the others wait and reuse it."""
    builds = []
    real_build = models.build_generated_checkpoint
    started = threading.Barrier(3)

    def counted_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.3)  # the other jobs find it missing meanwhile
        real_build(*args, **kwargs)

    monkeypatch.setattr(models, "build_generated_checkpoint", counted_build)
    found = []

    def job():
        started.wait()
        found.append(ensure_checkpoint(TINY, tmp_path))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(found) == 3 and len(set(found)) == 1
    assert (found[0] / "config.json").is_file()


def test_builds_are_byte_identical(tiny_dir, tokenizer, tmp_path):
    config = llama_config_for(TINY, len(tokenizer))
    for name in ("a", "b"):
        build_generated_checkpoint(tmp_path / name, config, tokenizer, seed=0, shards=2)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b") == file_digests(tiny_dir)


def test_weights_do_not_depend_on_sharding(tiny_dir, tokenizer, tmp_path):
    config = llama_config_for(TINY, len(tokenizer))
    build_generated_checkpoint(tmp_path / "three", config, tokenizer, seed=0, shards=3)
    assert len(set(checkpoint_tensor_index(tmp_path / "three").values())) == 3
    two, three = load_tensors(tiny_dir), load_tensors(tmp_path / "three")
    assert two.keys() == three.keys()
    assert all(torch.equal(two[name], three[name]) for name in two)
    build_generated_checkpoint(tmp_path / "seed1", config, tokenizer, seed=1, shards=2)
    seed1 = load_tensors(tmp_path / "seed1")
    assert not torch.equal(
        seed1["model.layers.0.self_attn.q_proj.weight"], two["model.layers.0.self_attn.q_proj.weight"]
    )


def test_shard_count_follows_size_limit(tokenizer, tmp_path, monkeypatch):
    # the 1 GiB rule, scaled down: a ~2 MB model with 0.5 MB shards needs 5 of them, however few were asked
    monkeypatch.setattr(models, "SHARD_BYTES", 500_000)
    build_generated_checkpoint(tmp_path / "m", llama_config_for(TINY, len(tokenizer)), tokenizer, seed=0, shards=2)
    files = set(checkpoint_tensor_index(tmp_path / "m").values())
    assert len(files) == 5 and all((tmp_path / "m" / f).stat().st_size < 1_000_000 for f in files)
    assert models._assign_shards([10, 1000, 10, 10], 3) == [0, 1, 2, 2]
    assert models._assign_shards([5, 5], 4) == [0, 1], "never an empty shard"


def test_interrupted_build_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        build_generated_checkpoint(tmp_path / "m", llama_config_for(TINY, len(tokenizer)), tokenizer, seed=0, shards=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "dtype"),
    [
        ({"tie_word_embeddings": True}, "bfloat16"),
        ({"rope_scaling": LLAMA3_ROPE}, "bfloat16"),
        ({}, "float32"),
    ],
    ids=["tied", "rope-llama3", "float32"],
)
def test_variants(overrides, dtype, tiny_dir, tmp_path):
    spec = ModelConfig(name="tiny", geometry="tiny", dtype=dtype, config_overrides=overrides)
    ckpt = ensure_checkpoint(spec, tmp_path)
    assert ckpt.name != tiny_dir.name
    model, info = LlamaForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    index = checkpoint_tensor_index(ckpt)
    assert model.dtype == getattr(torch, dtype)
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in index
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if "rope_scaling" in overrides:
        assert model.config.rope_parameters["rope_type"] == "llama3"
        assert model.config.rope_parameters["rope_theta"] == 500000.0
    with safe_open(str(ckpt / index["model.norm.weight"]), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == getattr(torch, dtype)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_greedy_decoding_is_not_degenerate(tiny_dir, tiny_model, tokenizer):
    prompt = tokenizer("The history of computing began with", return_tensors="pt")
    out = tiny_model.generate(
        **prompt,
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[0, prompt.input_ids.shape[1] :]
    assert len(set(new_tokens.tolist())) > 1
    top2 = torch.stack(out.logits).float().topk(2, dim=-1).values.squeeze(1)
    assert ((top2[:, 0] - top2[:, 1]) > 0).sum() >= 12, "top-1 should usually beat top-2 outright in bf16"

    # Teacher-forced over real text: peaked distributions, and fp32 mostly agrees with bf16 on the argmax.
    text = CORPUS_PATH.read_text()
    ids = torch.tensor([tokenizer(text[i : i + 2500]).input_ids[:256] for i in (0, 20000)])
    fp32 = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits16 = tiny_model(ids).logits.float()
        logits32 = fp32(ids).logits
    assert logits32.softmax(-1).amax(-1).median() > 0.2, "next-token distributions should not be flat"
    assert (logits16.argmax(-1) == logits32.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rows_beyond_the_tokenizer_never_win(tied, tokenizer, tmp_path):
    # the real geometries' 128256-row vocab, scaled down: greedy decoding must stay decodable
    overrides = {"vocab_size": 4096, "tie_word_embeddings": tied}
    ckpt = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny", config_overrides=overrides), tmp_path)
    model = LlamaForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([tokenizer(CORPUS_PATH.read_text()[:2000]).input_ids[:200]])
    with torch.no_grad():
        assert (model(ids).logits.argmax(-1) < len(tokenizer)).all()
