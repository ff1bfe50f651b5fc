"""The check of a source checkpoint, run each time it is split or a split of it is reused.

Every tensor the Llama model needs must be in the checkpoint, with its shape and in the dtype config.json
declares, and nothing else may be. Names, shapes and dtypes come from the safetensors headers and the
expected ones from transformers' own model built on the meta device: no weight is read, so the check costs
milliseconds, and it runs before the split folder is created. Running it on reuse too means that a split
written from a checkpoint that fails it (by an older harness) is refused the same way instead of failing
mid-run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

from harness.checkpoints.local import checkpoint_tensor_index
from harness.split.integrity import tensor_shapes

INDEX = "model.safetensors.index.json"
SHOWN = 5  # tensor names a message lists before "and N more"

# safetensors' dtype names -> torch's, as config.json spells a dtype.
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every tensor LlamaForCausalLM loads for `config`, in its state dict's order."""
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def declared_dtype(config: LlamaConfig) -> str | None:
    """config.json's dtype (`dtype`, else `torch_dtype`, as transformers reads them) as torch names it, or None."""
    dtype = config.dtype
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype if isinstance(dtype, str) and dtype != "auto" else None


def check_checkpoint_tensors(ckpt_dir: Path, config: LlamaConfig) -> dict[str, str]:
    """Every tensor the Llama model needs is in the checkpoint with its shape and the declared dtype, and nothing
    else is. Returns tensor -> file (relative to `ckpt_dir`). Raises ValueError naming the checkpoint, the
    tensors at fault and what to do."""
    expected = expected_tensors(config)
    index = checkpoint_tensor_index(ckpt_dir)
    headers: dict[str, dict[str, tuple[list[int], str]]] = {}
    for file in sorted(set(index.values())):
        if not (ckpt_dir / file).is_file():
            raise ValueError(
                f"checkpoint {ckpt_dir}: its {INDEX} lists the shard {file}, which is not in the directory; "
                "the checkpoint is incomplete: download or copy it again"
            )
        headers[file] = tensor_shapes(ckpt_dir / file)
    # A tensor that the index places in a shard whose header lacks it is as missing as one the index lacks.
    found = {name: headers[file][name] for name, file in index.items() if name in headers[file]}
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints still store a copy; the model ignores it
    _check_names(ckpt_dir, index, expected, found)
    for name, shape in expected.items():
        if tuple(found[name][0]) != shape:
            raise ValueError(
                f"checkpoint tensor {name} in {ckpt_dir / index[name]} has shape {found[name][0]}, "
                f"but config.json implies {list(shape)}: is config.json this checkpoint's?"
            )
    _check_dtypes(ckpt_dir, config, index, {name: found[name][1] for name in expected})
    return {name: index[name] for name in expected}


def _check_names(
    ckpt_dir: Path, index: dict[str, str], expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[list[int], str]],
) -> None:
    """Refuses a checkpoint that lacks a tensor the model needs, or holds one it has no place for."""
    missing = [name for name in expected if name not in found]
    if missing:
        # Listed by the index, absent from the shard's header: a shard cut short or replaced, or a stale index.
        stale = [f"{name} in {index[name]}" for name in missing if name in index]
        which = "which does not hold it" if len(stale) == 1 else "which do not hold them"
        where = f"; its {INDEX} places {_listed(stale)}, {which}" if stale else ""
        raise ValueError(
            f"checkpoint {ckpt_dir} lacks {len(missing)} tensor(s) that the model of its config.json needs: "
            f"{_listed(missing)}{where}. The checkpoint is incomplete (a download or save cut short) or config.json "
            "is another model's: download or copy the checkpoint again, or check that config.json's geometry "
            "(num_hidden_layers, tie_word_embeddings) is this checkpoint's"
        )
    extra = [name for name in found if name not in expected]
    if extra:
        raise ValueError(
            f"checkpoint {ckpt_dir} holds {len(extra)} tensor(s) that the Llama model of its config.json has no "
            f"place for: {_listed(extra)}. Check that config.json's geometry (num_hidden_layers, "
            "tie_word_embeddings) is this checkpoint's, and that it is a plain (unquantized) Llama checkpoint"
        )


def _check_dtypes(ckpt_dir: Path, config: LlamaConfig, index: dict[str, str], dtypes: dict[str, str]) -> None:
    """Refuses a checkpoint whose tensors are not all in the declared dtype (all in one dtype when none is declared).

    No tensor is exempt: LlamaForCausalLM's state dict holds parameters only (the rotary inv_freq buffer is not
    saved) and transformers keeps none of Llama's modules in float32, so its loader casts every one of these
    tensors to the declared dtype. The streamed layers compute in the stored dtype instead, where one odd
    tensor fails a matmul mid-run ("expected m1 and m2 to have the same dtype") naming nothing.
    """
    named = {name: TORCH_DTYPES.get(dtype, dtype) for name, dtype in dtypes.items()}
    declared = declared_dtype(config)
    counts = Counter(named.values())
    want = declared or counts.most_common(1)[0][0]
    odd = [name for name in named if named[name] != want]
    if not odd:
        return
    first = odd[0]
    if declared is not None:
        against = f"config.json declares dtype {declared}"
        fix = f"re-save the checkpoint in {declared}"
    else:
        against = f"{counts[want]} of its {len(named)} tensors are {want} (config.json declares no dtype)"
        fix = "re-save the checkpoint in one dtype and state it as \"dtype\" in config.json"
    others = f"; {len(odd) - 1} more tensor(s) are not {want} either: {_listed(odd[1:])}" if len(odd) > 1 else ""
    uniform = (
        f"; or, if {named[first]} is meant, set \"dtype\" (or \"torch_dtype\") in config.json to \"{named[first]}\""
        if declared is not None and len(counts) == 1 else ""
    )
    raise ValueError(
        f"checkpoint file {ckpt_dir / index[first]}: tensor {first} is {named[first]}, but {against}{others}. "
        "The streamed layers compute in their weights' dtype, so every tensor must be in one: "
        f"{fix} (e.g. LlamaForCausalLM.from_pretrained(path, dtype=torch.{want})"
        f".save_pretrained(new_path)) and run that{uniform}"
    )
