"""runner.cuda_graph: each decoder layer's one-token step replayed as a CUDA graph.

Eager, a decode step of transformers' LlamaDecoderLayer is 55 aten ops (views included), each issued by the host,
so a slow or contended host leaves the compute stream idle between kernels and sets the token's pace. A graph
replays a layer's kernels in one launch, taking that issue off the host (docs/findings.md has the figures).

A graph replays fixed addresses, so a decode pass runs on static buffers: the hidden state (each layer's output
written back over its input), cos/sin, the positions and the mask (copied in once a pass), one decoder layer's
weights, and transformers' StaticCache, whose layers keep their keys and values at fixed addresses and advance
their own position on the device. Each layer's weights are copied into the static ones before its replay: 9
device-to-device copies and a replay for the 55 ops, at the price of moving one decoded layer on the device each
time (`decoder_layer_bytes`, a fraction of a millisecond at device-memory bandwidth). Decoding straight into the
static buffers (bitsandbytes' `out=`) would save that copy; it is not done. Each layer has its graph (its cache
layer differs, and its skeleton's `layer_idx` names it); all share one memory pool. A layer runs eagerly at the
first decode pass, on the same buffers, and its graph is captured then. The prefill, and any pass of more than one
token, runs eagerly as always.

A capture that fails (an op that cannot be captured, in some version of transformers) turns graphs off for the
run with the reason in `failed`, and the run goes on eagerly: a finding, not a failed run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers import Cache, PreTrainedConfig, StaticCache

log = logging.getLogger(__name__)


class Replay(Protocol):
    def capture(self, step: Callable[[], None]) -> None:
        """Record `step` (it does not run)."""
        ...

    def replay(self) -> None:
        ...


class CudaGraphReplay:
    """`step` as a CUDA graph: captured on a side stream, replayed on the current one."""

    def __init__(self, pool: object) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, step: Callable[[], None]) -> None:
        # thread_local: the prefetch worker goes on issuing copies and decodes while the main thread captures.
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            step()

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    """The decode passes' static buffers and each decoder layer's graph."""

    def __init__(
        self, forward: Callable[..., torch.Tensor], make_replay: Callable[[object], Replay] | None = None
    ) -> None:
        """`forward`: the runner's eager decoder-layer forward, which each graph captures."""
        self._forward = forward
        self.pool: object = None
        self.make_replay = make_replay or CudaGraphReplay
        self.graphs: dict[int, Replay] = {}
        self.failed: str | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._cache: StaticCache | None = None
        self._cache_shape: tuple[int, int] | None = None

    def new_cache(self, config: PreTrainedConfig, batch: int, max_len: int) -> Cache:
        """The run's StaticCache, emptied: one for every generation, since each graph keeps its layer's addresses.
        A generation of another batch or length gets a new one, and the graphs are captured again."""
        if self._cache is None or self._cache_shape != (batch, max_len):
            self._cache, self._cache_shape = StaticCache(config=config, max_cache_len=max_len), (batch, max_len)
            self.graphs.clear()
            self._inputs.clear()
        else:
            with torch.inference_mode():  # its tensors were made in the runner's passes, which run in inference mode
                self._cache.reset()
        return self._cache

    def begin_pass(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> bool:
        """Whether this pass runs on graphs (one new token a sequence, a mask to copy, no failure so far); if so,
        its inputs go into the static buffers (made at the first decode pass)."""
        if self.failed is not None or hidden.shape[1] != 1 or not isinstance(mask, torch.Tensor):
            return False
        cos, sin = position_embeddings
        inputs = {"hidden": hidden, "cos": cos, "sin": sin, "mask": mask, "positions": position_ids}
        for name, value in inputs.items():
            static = self._inputs.get(name)
            if static is None or static.shape != value.shape or static.dtype != value.dtype:
                if self.graphs:  # a captured graph reads the old buffer: it cannot follow a new one
                    self._fail(f"the decode pass's {name} changed shape or dtype")
                    return False
                static = self._inputs[name] = torch.empty_like(value)
            static.copy_(value)
        return True

    @property
    def hidden(self) -> torch.Tensor:
        return self._inputs["hidden"]

    def forward(
        self, decoder: nn.Module, weights: dict[str, torch.Tensor], *_: object, cache: Cache, **__: object
    ) -> torch.Tensor:
        """A decoder layer's step this pass, in place of the eager forward (same arguments; the inputs are the
        static ones `begin_pass` filled): its graph replayed, or, the first time, run eagerly and captured."""
        self._static_weights(weights)
        index = decoder.self_attn.layer_idx  # which cache layer, and so which graph
        graph = self.graphs.get(index)
        if graph is not None:
            graph.replay()
            return self.hidden

        def step() -> None:
            self.hidden.copy_(self._forward(
                decoder, self._weights, self.hidden, mask=self._inputs["mask"], position_ids=self._inputs["positions"],
                cache=cache, position_embeddings=(self._inputs["cos"], self._inputs["sin"]),
            ))

        step()  # this pass's result, eagerly, on the same buffers; then the graph for the next passes
        if self.failed is None:
            self._capture(index, step)
        return self.hidden

    def _static_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if not self._weights:
            self._weights = {name: torch.empty_like(t) for name, t in weights.items()}
        for name, t in weights.items():
            self._weights[name].copy_(t)

    def _capture(self, index: int, layer_step: Callable[[], None]) -> None:
        if self.pool is None and torch.cuda.is_available():
            self.pool = torch.cuda.graph_pool_handle()
        graph = self.make_replay(self.pool)
        try:
            graph.capture(layer_step)
        except Exception as exc:  # the run goes on eagerly: what could not be captured is the finding
            self._fail(f"capturing layer {index}: {type(exc).__name__}: {exc}")
            return
        self.graphs[index] = graph

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.graphs.clear()
        log.warning("runner.cuda_graph off for the rest of the run: %s", reason)
