"""The layer-streaming Llama-3 model.

The model is never resident: transformers' own modules (embedding, LlamaDecoderLayer,
RMSNorm, lm_head) are built once as weightless skeletons on the meta device, and each
pass runs them in order with weights that the strategy pipeline has just put on the
device. `run_with_weights` runs a skeleton with those weights without keeping them, so a
layer's weights are released as soon as the loop drops them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from inspect import signature
from itertools import islice
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import Cache, LlamaConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from harness.measurement.metrics import Clock
from harness.measurement.profile import stage_range
from harness.measurement.timeline import LayerEvent, StageClock, Timeline
from harness.streaming.graphs import DecodeGraphs
from harness.streaming.pipeline import LayerPipeline
from harness.streaming.skeleton import run_with_weights
from strategies.kv_cache.base import KVCachePolicy, cache_bytes
from strategies.layer import DeviceLayer

# transformers 5 renamed the KV cache keyword of the decoder layer and the mask builder from
# `past_key_values` to `cache` within 5.x (5.17 has the old name, 5.24 the new); pyproject allows both.
# A wrong name would not fail: the layer takes **kwargs, so the cache would silently go unused.
CACHE_KEYWORD = "cache" if "cache" in signature(create_causal_mask).parameters else "past_key_values"


def causal_mask(
    config: LlamaConfig,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
) -> Any:
    """transformers' causal mask for this pass (None where its attention needs none)."""
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_KEYWORD: cache},
    )


@dataclass
class Generation:
    """One generation; with a batch, `prompt_ids`/`generated_ids` are its first sequence's."""

    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    # Every sequence of the batch (one for a single prompt): its prompt and its new tokens, up to its own EOS.
    prompts: list[list[int]] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)
    start_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)
    # Per step: the last position's logits ([batch, vocab] float32, on the host); kept only when asked.
    logits: list[torch.Tensor] = field(default_factory=list)
    # What the KV cache held at the end (0 without a cache; None where not measured), and for how many positions.
    kv_cache_bytes: int | None = None
    kv_cache_tokens: int = 0
    timeline: Timeline = field(default_factory=Timeline)
    # Figures the decoding loop itself measured (speculative decoding's acceptance), by RunReport name.
    metrics: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Greedy argmax, or temperature / top-p sampling from a seeded generator."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float, seed: int, device: torch.device):
        self.do_sample = do_sample
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if do_sample else []
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> list[int]:
        """ids: [batch, seq]; logits: [batch, vocab] float32 -> each sequence's next token id."""
        if not self.do_sample:
            return logits.argmax(dim=-1).tolist()
        return self.draw(self.distribution(ids, logits))

    def distribution(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities sampling draws from: [batch, vocab] logits, temperature- and top-p-warped, softmaxed."""
        for warp in self.warpers:
            logits = warp(ids, logits)
        return torch.softmax(logits, dim=-1)

    def draw(self, probs: torch.Tensor) -> list[int]:
        """One token per row of `probs` ([batch, vocab]), from this sampler's generator."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).tolist()

    def uniform(self) -> float:
        """A draw from U[0, 1) off the same generator: speculative sampling's acceptance test."""
        return float(torch.rand((), generator=self.generator, device=self.generator.device))


def forward_unit(module: nn.Module, weights: dict[str, torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
    """Run a weightless module skeleton on `weights`, which it does not keep."""
    return run_with_weights(module, weights, *args, **kwargs)


def embed_rows(embed: nn.Embedding, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [batch, q] -> their embeddings [batch, q, hidden] on input_ids' device, looked up where the table
    lies: on the host when the pipeline keeps it there, so that only the rows cross to the device."""
    table = weights["weight"]
    return forward_unit(embed, weights, input_ids.to(table.device)).to(input_ids.device)


def forward_decoder(
    decoder: LlamaDecoderLayer,
    weights: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: Cache | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One decoder layer's forward, exactly as every pass runs it (the link probe times this same call).

    hidden: [batch, q, hidden] -> [batch, q, hidden].
    """
    return forward_unit(
        decoder,
        weights,
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        **{CACHE_KEYWORD: cache},
        position_embeddings=position_embeddings,
    )


def _each(module: nn.Module, weights: dict[str, torch.Tensor], inputs: list[torch.Tensor], *,
          fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """`fn(module, weights, x)` for each input apart, on one unit's weights: each with the shape of its own pass."""
    return [fn(module, weights, x) for x in inputs]


class StreamingModel:
    def __init__(
        self,
        config: LlamaConfig,
        units: Sequence[str],
        pipeline: LayerPipeline,
        kv_policy: KVCachePolicy,
        device: torch.device,
        clock: Clock,
        stages: StageClock,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        if len(units) != config.num_hidden_layers + 3:
            raise ValueError(f"expected embed, {config.num_hidden_layers} layers, norm, lm_head; got {units}")
        self.config = config
        self.units = list(units)
        self.pipeline = pipeline
        self.kv_policy = kv_policy
        self.device = device
        self.clock = clock  # token times: syncs the device, so a reading means the token exists
        self.stages = stages
        # runner.cuda_graph: decode passes' layers replayed as CUDA graphs, on a static cache it keeps.
        self.graphs = graphs
        self.timeline = Timeline()
        self.passes = 0
        with init_empty_weights():
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = [LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The rotary table is tiny and computed, not loaded: build it for real, on the device.
        self.rotary = LlamaRotaryEmbedding(config).to(device)

    def _run(
        self, layer: DeviceLayer, forward: Callable[..., torch.Tensor], module: nn.Module, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """`forward(module, layer.weights, ...)`, timed as the layer's compute; then its weights are released."""
        h0 = self.stages.host()
        c0 = self.stages.device()
        with stage_range("compute", layer.name):
            out = forward(module, layer.weights, *args, **kwargs)
        c1 = self.stages.device()
        issue_s = self.stages.host() - h0
        layer.weights.clear()  # the last reference to this layer's device weights
        r1 = self.stages.device()
        stamps = {**layer.stamps, "compute": (c0, c1), "release": (c1, r1)}
        self.timeline.events.append(
            LayerEvent(self.passes, layer.name, stamps, layer.bytes, compute_issue_s=issue_s,
                       load_issue_s=layer.load_issue_s)
        )
        return out

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: object | None,
        all_positions: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass over every unit. input_ids: [batch, q] (the new tokens, or the whole sequences
        without a KV cache) -> logits [batch, vocab] of the last position, or [batch, q, vocab] of every
        position (teacher forcing). attention_mask: [batch, past + q], 0 at left padding; None: no padding."""
        pass_start = self.stages.device()
        q = input_ids.shape[1]
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + q, device=self.device).unsqueeze(0)
        else:
            # As transformers' generate: a left-padded sequence's positions count its own tokens only.
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            position_ids = positions[:, -q:]
        layers = self.pipeline.stream(self.units)

        hidden = self._run(next(layers), embed_rows, self.embed, input_ids)  # [batch, q, hidden]
        h0 = self.stages.host()
        p0 = self.stages.device()
        position_embeddings = self.rotary(hidden, position_ids)  # (cos, sin): [batch, q, head_dim] each
        mask = causal_mask(self.config, hidden, attention_mask, cache, position_ids)
        # Compute that belongs to no layer's weights; timed so a pass's stages still add up to its wall time.
        p1 = self.stages.device()
        self.timeline.events.append(
            LayerEvent(self.passes, "rope+mask", {"compute": (p0, p1)}, compute_issue_s=self.stages.host() - h0)
        )
        graphed = (
            self.graphs is not None
            and cache is not None
            and self.graphs.begin_pass(hidden, position_embeddings, mask, position_ids)
        )
        forward = self.graphs.forward if graphed else forward_decoder
        for decoder, layer in zip(self.layers, islice(layers, len(self.layers)), strict=True):
            hidden = self._run(
                layer,
                forward,
                decoder,
                hidden,
                mask=mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
            )
        if not all_positions:
            hidden = hidden[:, -1:, :]  # generation decodes only the last position
        hidden = self._run(next(layers), forward_unit, self.norm, hidden)
        logits = self._run(next(layers), forward_unit, self.lm_head, hidden)  # [1, q or 1, vocab]
        self.timeline.passes.append((pass_start, self.stages.device()))
        self.passes += 1
        return logits.float() if all_positions else logits[:, -1, :].float()

    @torch.inference_mode()
    def forward_steps(
        self,
        steps: Sequence[torch.Tensor],
        cache: object | None = None,
        *,
        caches: Sequence[object | None] | None = None,
    ) -> torch.Tensor:
        """One streamed pass that computes each of several steps exactly as a pass of its own would: `steps[j]` is
        step j's input ([1, q]: its new token with a KV cache, the whole sequence so far without one), and every
        layer runs the steps one after another with the shapes, positions and masks of that one-step pass. Each
        layer's weights still cross the link once. -> [len(steps), vocab] float32: each step's last logits.

        Speculative decoding verifies with it: its tokens are then greedy's bit for bit in any dtype, where one
        call over every position (`forward(all_positions=True)`) rounds differently in bf16 (other matmul shapes).
        `caches`, instead of the one `cache`: each step's own (a batch's sequences, each with its cache).
        """
        pass_start = self.stages.device()
        caches = list(caches) if caches is not None else [cache] * len(steps)
        starts, added = [], {}
        for step, step_cache in zip(steps, caches, strict=True):
            # With a cache, each step's tokens follow what its cache holds and its earlier steps in this pass;
            # without one, each step is a whole sequence.
            if step_cache is None:
                starts.append(0)
                continue
            key = id(step_cache)
            starts.append(step_cache.get_seq_length() + added.get(key, 0))
            added[key] = added.get(key, 0) + step.shape[1]
        position_ids = [
            torch.arange(start, start + step.shape[1], device=self.device).unsqueeze(0)
            for start, step in zip(starts, steps, strict=True)
        ]
        layers = self.pipeline.stream(self.units)
        hiddens = self._run(next(layers), _each, self.embed, list(steps), fn=embed_rows)
        h0, p0 = self.stages.host(), self.stages.device()
        position_embeddings = [self.rotary(h, p) for h, p in zip(hiddens, position_ids, strict=True)]
        self.timeline.events.append(LayerEvent(
            self.passes, "rope+mask", {"compute": (p0, self.stages.device())}, compute_issue_s=self.stages.host() - h0
        ))
        masks: list[Any] = []  # each step's, made in the first layer (timed as its compute)

        def run_steps(decoder: nn.Module, weights: dict[str, torch.Tensor], hiddens: list) -> list[torch.Tensor]:
            out = []
            for j, hidden in enumerate(hiddens):
                if len(masks) == j:  # in the first layer, whose cache holds what step j's own pass would see
                    masks.append(causal_mask(self.config, hidden, None, caches[j], position_ids[j]))
                out.append(forward_decoder(decoder, weights, hidden, mask=masks[j], position_ids=position_ids[j],
                                           cache=caches[j], position_embeddings=position_embeddings[j]))
            return out

        for decoder, layer in zip(self.layers, islice(layers, len(self.layers)), strict=True):
            hiddens = self._run(layer, run_steps, decoder, hiddens)
        hiddens = self._run(next(layers), _each, self.norm, [h[:, -1:, :] for h in hiddens], fn=forward_unit)
        logits = self._run(next(layers), _each, self.lm_head, hiddens, fn=forward_unit)
        self.timeline.passes.append((pass_start, self.stages.device()))
        self.passes += 1
        return torch.cat([step_logits[:, -1, :] for step_logits in logits]).float()

    def generate(self, prompt_ids: Sequence[int], *args: Any, **kwargs: Any) -> Generation:
        """One prompt: prefill, then one pass per new token; stops at EOS or `max_new_tokens` (`generate_batch`'s
        arguments after the prompts)."""
        return self.generate_batch([prompt_ids], *args, **kwargs)

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampler: Callable[[torch.Tensor, torch.Tensor], list[int]],
        eos_token_ids: Sequence[int] = (),
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Several prompts through each streamed pass, left-padded to one length: every pass moves a layer's
        weights once for the whole batch. A sequence ends at its own EOS; the batch when all have ended."""
        self.timeline, self.passes = Timeline(), 0
        prompts = [list(p) for p in prompts]
        result = Generation(prompt_ids=prompts[0], start_s=self.clock(), timeline=self.timeline, prompts=prompts)
        result.sequences = [[] for _ in prompts]
        width = max(len(p) for p in prompts)
        if self.graphs is not None:  # one static cache for every generation: the graphs keep its addresses
            cache = self.graphs.new_cache(self.config, len(prompts), width + max_new_tokens)
        else:
            cache = self.kv_policy.new_cache(self.config, self.device)
        # Padding ids are never attended to; any id will do.
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # [batch, seq]
        mask = None
        if any(len(p) < width for p in prompts):
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        ended = [False] * len(prompts)
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self.forward(step_input, cache, attention_mask=mask)
            tokens = sampler(ids, logits)
            result.token_times_s.append(self.clock())
            for index, token in enumerate(tokens):
                if not ended[index]:
                    result.sequences[index].append(token)
                    ended[index] = token in eos_token_ids
            if keep_logits:
                result.logits.append(logits.cpu())
            if on_token is not None:  # after the clock reading: a progress bar is not generation time
                on_token(tokens[0])
            if all(ended):
                break
            # An ended sequence keeps a row (its tokens are ignored): the others' shapes and positions stay put.
            ids = torch.cat([ids, torch.tensor([tokens], device=self.device).T], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            # With a KV cache only the new tokens go through the layers; without one, all of them.
            step_input = ids[:, -1:] if cache is not None else ids
        result.generated_ids = result.sequences[0]
        result.kv_cache_bytes = cache_bytes(cache)  # 0 without a cache: nothing is kept between passes
        if cache is not None:
            result.kv_cache_tokens = int(cache.get_seq_length())  # a static cache's is a device tensor
        return result
