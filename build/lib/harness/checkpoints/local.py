"""A local Hugging Face checkpoint directory: checked before any work, and its tensor index."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


def validate_local(path: Path) -> Path:
    """Fail in milliseconds, with what to do, instead of deep inside from_pretrained."""
    hint = "pass a Hugging Face Llama checkpoint directory (config.json, *.safetensors, tokenizer.json)"
    if not path.is_dir():
        raise ValueError(f"model.path={path} does not exist or is not a directory: {hint}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json, so it is not a Hugging Face checkpoint: {hint}")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"{path}/config.json has model_type={model_type!r}: only Llama-family ('llama') checkpoints are supported"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shard_files = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(f for f in shard_files if not (path / f).is_file())
        if missing:
            raise ValueError(
                f"{path} is missing safetensors shards listed in its index: {', '.join(missing)}; "
                "re-download the checkpoint"
            )
    elif not (path / "model.safetensors").is_file():
        bins = sorted(p.name for p in path.glob("*.bin"))
        found = f" (found only {', '.join(bins)})" if bins else ""
        raise ValueError(
            f"{path} has no safetensors weights{found}: expected model.safetensors or "
            "model.safetensors.index.json plus its shards. .bin checkpoints must be converted first, e.g. "
            "LlamaForCausalLM.from_pretrained(path).save_pretrained(new_path) writes safetensors"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(
            f"{path} has no tokenizer files (tokenizer.json or tokenizer.model): copy them from the "
            "model's Hugging Face repository into the directory"
        )
    return path.resolve()


def checkpoint_tensor_index(ckpt_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name (relative to ckpt_dir)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single.name)
    raise FileNotFoundError(f"{ckpt_dir} has neither model.safetensors.index.json nor model.safetensors")
