"""One decoder layer's compute time in a decode step, timed through the very call the runner makes."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from harness.device import indexed_device
from harness.probe.links import best_seconds, timed_seconds
from strategies.checks import check_positive

if TYPE_CHECKING:
    from transformers import LlamaConfig

# Decode step against this many cached positions, so attention reads a KV cache as it does in generation.
_PREFILLED_POSITIONS = 8


# Elements of a weight drawn at random; a larger weight repeats them. Drawing every element of a large weight
# (Llama-3-70B's lm_head has 1.05G) costs seconds on a few cores, copying a drawn tile over it a fraction of that,
# and a matmul's time does not depend on which finite values it multiplies.
_TILE_ELEMENTS = 1 << 24


def random_weights(
    names_and_shapes: dict[str, torch.Size], config: LlamaConfig, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    # Filled explicitly because uninitialized memory may hold NaNs or denormals, which can make CPU
    # matmuls many times slower than real weights.
    weights = {}
    for name, shape in names_and_shapes.items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            flat = tensor.view(-1)
            tile = flat[:_TILE_ELEMENTS].normal_(0.0, config.initializer_range)
            for start in range(tile.numel(), flat.numel(), tile.numel()):
                chunk = flat[start : start + tile.numel()]
                chunk.copy_(tile[: chunk.numel()])
        weights[name] = tensor
    return weights


def measure_layer_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, seq_len: int = 1, repeats: int = 5,
    batch: int = 1,
) -> float:
    """Seconds for ONE decoder layer's forward in a decode step (best of `repeats`, after a warm-up):
    the runner's own `forward_decoder` on a transformers LlamaDecoderLayer skeleton with random weights,
    `batch` sequences of `seq_len` new positions each, against a DynamicCache already holding a few per
    sequence. Multiply by the layer count for a step's decoder compute (embedding, final norm and lm_head
    are not in it).

    A batch is timed as the runner computes it, `batch` sequences side by side: not as one sequence
    `batch` times longer, whose causal attention grows with the square of its length."""
    # Imported here: the runner and transformers' model code are only needed once a layer is timed,
    # not by the link rates or the cache that sit beside this.
    from accelerate import init_empty_weights
    from transformers.cache_utils import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from harness.streaming.model import causal_mask, forward_decoder

    check_positive("seq_len", seq_len)
    check_positive("batch", batch)
    device = indexed_device(device)
    config = copy.deepcopy(config)  # the caller's config keeps its own attention implementation
    config._attn_implementation = "sdpa"  # what the runner and the reference use

    # A weightless skeleton and a separate weights dict, as the runner streams them: no fp32 host init
    # of ~218M parameters for the 8B geometry, and the timed call is the runner's, weights handling included.
    with init_empty_weights():
        decoder = LlamaDecoderLayer(config, 0)
    decoder.eval()
    shapes = {name: tensor.shape for name, tensor in decoder.state_dict().items()}
    weights = random_weights(shapes, config, dtype, device)
    rotary = LlamaRotaryEmbedding(config).to(device)

    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq_len, config.hidden_size, dtype=dtype, device=device, generator=generator)
    past_kv_shape = (batch, config.num_key_value_heads, _PREFILLED_POSITIONS, config.head_dim)
    past_k = torch.randn(past_kv_shape, dtype=dtype, device=device, generator=generator)
    past_v = torch.randn(past_kv_shape, dtype=dtype, device=device, generator=generator)
    # Every sequence at the same positions and no padding mask, as in an unpadded batch: a padded batch's
    # mask can only add work, and a floor prices the least a step can cost.
    positions = torch.arange(_PREFILLED_POSITIONS, _PREFILLED_POSITIONS + seq_len, device=device)
    position_ids = positions.unsqueeze(0).expand(batch, seq_len)
    position_embeddings = rotary(hidden, position_ids)  # once per pass in the runner, not per layer: untimed

    def prepare() -> Callable[[], object]:
        # A fresh cache per run: each forward appends to it, and every run should see the same past length.
        cache = DynamicCache()
        cache.update(past_k, past_v, layer_idx=0)
        mask = causal_mask(config, hidden, None, cache, position_ids)
        return lambda: forward_decoder(
            decoder,
            weights,
            hidden,
            mask=mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
        )

    with torch.inference_mode():
        return best_seconds(prepare, device, repeats)


def measure_head_compute_s(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, repeats: int = 5, batch: int = 1,
    evict: Callable[[], None] | None = None,
) -> float:
    """Seconds for the end of a decode step: the final norm and lm_head on the last position of each of
    `batch` sequences, as the runner computes them: the best of `repeats`, the least it costs (the floor's).
    With `evict`, called untimed before each, the median: a run's decoder layers pass through the device's
    caches between two heads, so a head that fits them (SmolLM2's 57 MB) finds its weights evicted (the plan's).

    The decoder layers are not all of a token's compute: with a 128k vocabulary, lm_head alone reads
    as many bytes as a decoder layer of the 1B geometry, so a floor without it is too low.
    """
    from accelerate import init_empty_weights
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from harness.streaming.model import forward_unit

    check_positive("batch", batch)
    device = indexed_device(device)
    with init_empty_weights():
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    norm_w = random_weights({"weight": torch.Size([config.hidden_size])}, config, dtype, device)
    norm_w["weight"].fill_(1.0)
    head_w = random_weights({"weight": torch.Size([config.vocab_size, config.hidden_size])}, config, dtype, device)
    hidden = torch.randn(batch, 1, config.hidden_size, dtype=dtype, device=device)

    def prepare() -> Callable[[], object]:
        if evict is not None:
            evict()
        return lambda: forward_unit(head, head_w, forward_unit(norm, norm_w, hidden))

    with torch.inference_mode():
        if evict is None:
            return best_seconds(prepare, device, repeats)
        return statistics.median(timed_seconds(prepare, device, repeats))
