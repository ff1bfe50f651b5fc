"""Generated checkpoints: a Llama-3-shaped Hugging Face directory built here, no network.

Generated checkpoints are real Hugging Face directories (sharded safetensors + index, config,
generation config, tokenizer files) whose weights are a pure function of (seed, tensor name),
so every consumer reads them exactly as it would read Meta's weights. `ensure_checkpoint` is
the one entry: it builds a generated model once, or validates a local directory.

A model whose weights are larger than DIRECT_SPLIT_BYTES (the 70B geometry: 141 GB in bf16, more than a GPU
machine's disk) gets a weightless directory instead: config, generation config, tokenizer and `generator.json`,
the recipe its weights are drawn from. Its splits are generated straight from that recipe, unit by unit
(harness/split/sources.py), so the bf16 weights are never written or held whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from harness.allocator import host_malloc
from harness.checkpoints.gguf import ensure_gguf_checkpoint
from harness.checkpoints.local import validate_local
from harness.checkpoints.tokenizer import BOS, CORPUS_PATH, EOT, SPECIAL_IDS, STOP_TOKENS, VOCAB_SIZE, build_tokenizer
from harness.files import folder_build_lock

if TYPE_CHECKING:
    from harness.config import ModelConfig

log = logging.getLogger(__name__)

# Bump whenever the same inputs would produce different checkpoint bytes (init scheme, layout, tokenizer).
GENERATOR_VERSION = "2"

GEOMETRY_DIR = Path(__file__).resolve().parents[1] / "geometries"

SHARD_BYTES = 1 << 30
CPU = torch.device("cpu")
# A generated model whose weights are larger is never written whole: its splits are generated straight from the
# seed. Between the 8B geometry (16 GB in bf16, written as before) and the 70B one (141 GB, over a 64 GiB disk).
DIRECT_SPLIT_BYTES = 32 << 30
# In a weightless checkpoint directory: the recipe its weights are generated from, unit by unit, into each split.
GENERATOR_FILE = "generator.json"


def load_geometry(name: str) -> dict:
    available = sorted(p.stem for p in GEOMETRY_DIR.glob("*.json"))
    if name not in available:
        raise ValueError(f"unknown geometry {name!r}: choose one of {', '.join(available)} (files in {GEOMETRY_DIR})")
    return json.loads((GEOMETRY_DIR / f"{name}.json").read_text())


def _plain(value: Any) -> Any:
    """A plain deep copy: Hydra may hand us a DictConfig, and LlamaConfig mutates rope dicts in place."""
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def _rope_parameters(fields: dict) -> dict:
    """Fold config.json's legacy rope_theta/rope_scaling into transformers 5's single rope_parameters dict."""
    theta = fields.pop("rope_theta", None)
    scaling = fields.pop("rope_scaling", None)
    rope = dict(fields.pop("rope_parameters", None) or scaling or {})
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    # A top-level rope_theta is how Llama-3 config.json files and overrides state it, so it wins.
    if theta is not None:
        rope["rope_theta"] = theta
    return rope


def llama_config_for(model: ModelConfig, tokenizer_vocab_size: int) -> LlamaConfig:
    fields = load_geometry(model.geometry)
    if fields.pop("model_type", "llama") != "llama":
        raise ValueError(f"geometry {model.geometry!r} is not a llama geometry")
    for stale in ("transformers_version", "torch_dtype", "dtype"):
        fields.pop(stale, None)
    fields.update(_plain(model.config_overrides or {}))
    fields.setdefault("vocab_size", tokenizer_vocab_size)
    if fields["vocab_size"] < tokenizer_vocab_size:
        raise ValueError(f"vocab_size={fields['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab_size}")
    fields["rope_parameters"] = _rope_parameters(fields)
    fields.setdefault("architectures", ["LlamaForCausalLM"])
    # Ids come from our tokenizer, not the geometry: the generated weights are only ever used with it.
    fields.update(bos_token_id=SPECIAL_IDS[BOS], eos_token_id=SPECIAL_IDS[EOT], pad_token_id=None)
    return LlamaConfig(**fields, dtype=model.dtype)


def tensor_specs(config: LlamaConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for every tensor of LlamaForCausalLM's state dict, in its order."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    yield (
        "model.embed_tokens.weight",
        (config.vocab_size, hidden),
        "tied" if config.tie_word_embeddings else "embed",
    )
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        projections = [
            ("self_attn.q_proj", (q_out, hidden), config.attention_bias),
            ("self_attn.k_proj", (kv_out, hidden), config.attention_bias),
            ("self_attn.v_proj", (kv_out, hidden), config.attention_bias),
            ("self_attn.o_proj", (hidden, q_out), config.attention_bias),
            ("mlp.gate_proj", (inter, hidden), config.mlp_bias),
            ("mlp.up_proj", (inter, hidden), config.mlp_bias),
            ("mlp.down_proj", (hidden, inter), config.mlp_bias),
        ]
        for proj, shape, has_bias in projections:
            yield f"{p}{proj}.weight", shape, "linear"
            if has_bias:
                yield f"{p}{proj}.bias", shape[:1], "bias"
        yield f"{p}input_layernorm.weight", (hidden,), "norm"
        yield f"{p}post_attention_layernorm.weight", (hidden,), "norm"
    yield "model.norm.weight", (hidden,), "norm"
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, hidden), "unembed"


def generate_tensor(
    seed: int,
    name: str,
    shape: tuple[int, ...],
    kind: str,
    dtype: torch.dtype,
    live_rows: int,
    device: torch.device = CPU,
    to_host: bool = True,
) -> torch.Tensor:
    """One tensor's seeded values in `dtype`, drawn on `device`; on the host unless `to_host` is false (a split
    generated on the GPU encodes it there)."""
    # One generator per tensor, seeded by a stable hash of its name: values do not depend on write order,
    # sharding or PYTHONHASHSEED, and a tensor loaded into the wrong slot has visibly different values.
    # They do depend on the generator's device (CPU and CUDA draw different streams from one seed).
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    # Scales keep activations at RMS ~1 and make the next-token distribution peaked, like a trained model's:
    # - linear N(0, 1/sqrt(fan_in)), not HF's 0.02: variance-preserving, so q.k/sqrt(d) spreads ~1 (attention
    #   neither uniform nor one-hot) and every layer moves the residual stream (with 0.02 the layers add ~0).
    # - embed N(0, 1): the residual stream starts at unit scale.
    # - lm_head N(0, 1/sqrt(hidden)) with log-normal row norms (as trained unembeddings, whose norms track
    #   token frequency): plain Gaussian logits are nearly flat (median top-1 prob 0.015 on the tiny model,
    #   ~3% bf16 top-2 ties); sigma 0.75 gives a median top-1 prob ~0.7 and halves bf16-vs-fp32 argmax flips
    #   (to ~1%; bf16 activation noise, ~0.4% per layer, sets that floor whatever the scales).
    # - tied embed/lm_head N(0, 2/sqrt(hidden)): at N(0, 1) the residual skip makes the model predict its
    #   input token every time, at 1/sqrt(hidden) logits are flat; row norms stay equal because a tied
    #   high-norm token reinforces itself into greedy loops.
    # - norm 1 + N(0, 0.05): unit gain keeps the scales above; the noise makes every norm vector distinct.
    fan_in = shape[-1]  # the hidden size, for embed/lm_head
    if kind == "linear":
        t *= fan_in**-0.5
    elif kind == "norm":
        t = t.mul_(0.05).add_(1.0)
    elif kind == "bias":
        t *= 0.02
    elif kind == "unembed":
        t *= fan_in**-0.5 * torch.exp(0.75 * torch.randn(shape[0], 1, generator=gen, device=device))
    elif kind == "tied":
        t *= 2 * fan_in**-0.5
    if kind in ("unembed", "tied"):
        # Real geometries have 128256 rows but our tokenizer only 1024 ids: equally large dead rows would win
        # ~98% of argmaxes with undecodable ids. 2**-6 only shifts bf16 exponents, so the bytes stay as
        # incompressible as trained weights' while greedy decoding stays inside the tokenizer's vocab.
        t[live_rows:] *= 2**-6
    t = t.to(dtype)
    return t.cpu() if to_host else t


def _assign_shards(sizes: list[int], n: int) -> list[int]:
    """Shard index per tensor: contiguous, balanced by bytes, and no shard left empty."""
    n = min(n, len(sizes))
    total, start, prev, out = sum(sizes), 0, -1, []
    for i, size in enumerate(sizes):
        target = min(n - 1, (start + size // 2) * n // total)
        prev = min(max(target, prev, n - (len(sizes) - i)), prev + 1)
        out.append(prev)
        start += size
    return out


def _model_dtype(config: LlamaConfig) -> torch.dtype:
    dtype = config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def weights_bytes(config: LlamaConfig) -> int:
    """The bytes of every weight of `config`'s model in its dtype: what its checkpoint (or an uncompressed split)
    holds."""
    itemsize = _model_dtype(config).itemsize
    return sum(math.prod(shape) * itemsize for _, shape, _ in tensor_specs(config))


def splits_directly(model: ModelConfig) -> bool:
    """Whether `model` is generated straight into each split, never written as a checkpoint: a generated model whose
    weights are larger than DIRECT_SPLIT_BYTES."""
    if model.source != "generated":
        return False
    return weights_bytes(llama_config_for(model, VOCAB_SIZE)) > DIRECT_SPLIT_BYTES


def _checked_tmp(out_dir: Path, config: LlamaConfig, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A fresh temporary folder beside `out_dir` holding the files every checkpoint has: config, generation config
    and tokenizer."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; a checkpoint is never built over another")
    if (config.bos_token_id, config.eos_token_id) != (tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise ValueError("the config's bos/eos ids are not the tokenizer's: build it with llama_config_for")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier process that had our pid
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, do_sample=False)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    try:
        os.replace(tmp, out_dir)
    except OSError as err:
        # A concurrent build of the same directory won the race; its files are byte-identical to ours.
        raise FileExistsError(f"{out_dir} appeared while it was being built") from err


def build_generated_checkpoint(
    out_dir: Path,
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    shards: int,
    device: torch.device = CPU,
) -> None:
    out_dir = Path(out_dir)
    dtype = _model_dtype(config)
    specs = list(tensor_specs(config))
    sizes = [math.prod(shape) * dtype.itemsize for _, shape, _ in specs]
    total = sum(sizes)
    n_shards = min(max(shards, math.ceil(total / SHARD_BYTES)), len(specs))
    shard_of = _assign_shards(sizes, n_shards)
    names = (
        ["model.safetensors"]
        if n_shards == 1
        else [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    )

    tmp = _checked_tmp(out_dir, config, tokenizer)
    try:
        weight_map: dict[str, str] = {}
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task(f"generating {out_dir.name}", total=total)
            # Only one shard's tensors are alive at a time: the 8B geometry is 16 GB in bf16.
            for k, file_name in enumerate(names):
                shard = {}
                for (name, shape, kind), size, s in zip(specs, sizes, shard_of, strict=True):
                    if s == k:
                        shard[name] = generate_tensor(seed, name, shape, kind, dtype, len(tokenizer), device)
                        weight_map[name] = file_name
                        progress.advance(task, size)
                save_file(shard, str(tmp / file_name), metadata={"format": "pt"})
                del shard
        if n_shards > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_weightless_checkpoint(
    out_dir: Path,
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerFast,
    *,
    name: str,
    seed: int,
    device: torch.device = CPU,
) -> None:
    """A checkpoint directory without weights: config, generation config, tokenizer, and GENERATOR_FILE, the recipe
    (seed, dtype, generator device, tokenizer rows) that its splits generate every weight from, exactly as
    `build_generated_checkpoint` would have written it."""
    out_dir = Path(out_dir)
    recipe = {
        "generator": GENERATOR_VERSION,
        "model": name,
        "seed": seed,
        "dtype": str(_model_dtype(config)).removeprefix("torch."),
        "device": device.type,
        "live_rows": len(tokenizer),
        "weights_bytes": weights_bytes(config),
    }
    tmp = _checked_tmp(out_dir, config, tokenizer)
    try:
        (tmp / GENERATOR_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _generated_key(model: ModelConfig) -> str:
    recipe = {
        "generator": GENERATOR_VERSION,
        "geometry": load_geometry(model.geometry),
        "overrides": _plain(model.config_overrides or {}),
        "dtype": model.dtype,
        "seed": model.seed,
        "shards": model.shards,
        # the tokenizer (and so the tiny vocab size) is trained on the corpus: editing it changes the files
        "corpus": hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest(),
    }
    if model.generator_device != "cpu":  # other values, so another checkpoint (CPU keys stay as they were)
        recipe["generator_device"] = model.generator_device
    if splits_directly(model):  # a weightless directory never shares a name with a written one
        recipe["weights"] = "generated into each split"
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def generated_dir(model: ModelConfig, outputs_dir: Path) -> Path:
    """Where the generated `model`'s checkpoint is (or would be) built."""
    return Path(outputs_dir) / "models" / f"{model.name}-{_generated_key(model)}"


@host_malloc("glibc")  # untimed, and blocks of many sizes: glibc's defaults hand them back after
def ensure_checkpoint(model: ModelConfig, outputs_dir: Path) -> Path:
    if model.source == "local":
        return validate_local(Path(model.path).expanduser())
    if model.source == "gguf":
        return ensure_gguf_checkpoint(model, outputs_dir)
    out_dir = generated_dir(model, outputs_dir)
    # Builds are atomic (os.replace of a finished directory), so existing means complete.
    if (out_dir / "config.json").is_file():
        log.info("reusing generated checkpoint %s", out_dir)
        return out_dir
    # Jobs of a parallel sweep build it once (the 8B geometry is 16 GB): the others wait, then reuse it.
    with folder_build_lock(out_dir, on_wait=lambda: log.info("waiting for another job building %s", out_dir)):
        if (out_dir / "config.json").is_file():
            log.info("reusing generated checkpoint %s", out_dir)
            return out_dir
        _build(model, out_dir)
    return out_dir


def _build(model: ModelConfig, out_dir: Path) -> None:
    tokenizer = build_tokenizer()
    config = llama_config_for(model, len(tokenizer))
    device = torch.device(model.generator_device)
    if splits_directly(model):
        log.info(
            "model %s: its %.1f GB of weights are generated straight into each split (seed %d, on %s); %s holds "
            "its config and tokenizer only", model.name, weights_bytes(config) / 1e9, model.seed, device, out_dir,
        )
        build_weightless_checkpoint(out_dir, config, tokenizer, name=model.name, seed=model.seed, device=device)
        return
    log.info(
        "building generated checkpoint %s (geometry %s, %s, seed %d)",
        out_dir,
        model.geometry,
        model.dtype,
        model.seed,
    )
    build_generated_checkpoint(out_dir, config, tokenizer, seed=model.seed, shards=model.shards, device=device)
