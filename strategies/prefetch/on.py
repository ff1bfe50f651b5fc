"""prefetch=on: load the next `depth` layers in a background thread while the current one computes.

Loading (read, copy, decode) runs in one worker thread: file reads and bitsandbytes/torch
kernels release the GIL, so they overlap with compute on the main thread. On CUDA the
worker issues its host-to-device copies on a stream of its own and its decodes on another,
so the next layer's copy never queues behind this one's decode; compute waits on an event
for its own layer only, never for the whole device. On the CPU a unit that loads faster than a
hand-over to the worker costs (`INLINE_BELOW_S`) is loaded in turn.

On CUDA nothing in a load waits for the device, so the host could issue a whole pass before the
device computes its first layer, each layer's memory newly allocated (the allocator reuses a block
only once every stream that used it has passed that use). The worker therefore starts a unit's load
only once the compute `depth + 1` units back has finished: at most `depth + 1` units' weights are on
the device, as the VRAM estimate counts, and the allocator reuses their blocks pass after pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from strategies.layer import DeviceLayer
from strategies.prefetch.base import Decode, Fetch
from strategies.prefetch.configs import PrefetchOnConfig

# On the CPU, handing a load to the worker and back costs about 0.1 ms, more than a small unit's load from RAM:
# a unit whose last load took less is loaded in turn instead.
INLINE_BELOW_S = 1e-4


class PrefetchOn:
    def __init__(self, cfg: PrefetchOnConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.layers_ahead = cfg.depth
        # Streams exist only on CUDA; elsewhere the worker thread alone gives the overlap. Copies and decodes get
        # a stream each: on one stream they would run in turn, each copy queued behind the decode before it.
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.decode_stream = torch.cuda.Stream(device) if cuda else None
        # One worker for every pass: a pool per pass would start and join a thread each token.
        self._pool: ThreadPoolExecutor | None = None
        # CPU only: each unit's last load, in host seconds. On CUDA the host only issues asynchronous work, so
        # its time says nothing of the load's.
        self._load_s: dict[str, float] = {}

    def _load(
        self,
        fetch: Callable[[str], DeviceLayer],
        decode: Callable[[DeviceLayer], DeviceLayer],
        name: str,
        freed: torch.cuda.Event | None = None,
    ) -> tuple[DeviceLayer, torch.cuda.Event | None]:
        """`name` loaded; on CUDA, once `freed` (the compute `depth + 1` units back) has finished."""
        if self.copy_stream is None or self.decode_stream is None:
            t0 = time.perf_counter()
            layer = decode(fetch(name))
            self._load_s[name] = time.perf_counter() - t0
            return layer, None
        if freed is not None:
            freed.synchronize()  # this thread only: the main thread goes on issuing compute
        with torch.cuda.stream(self.copy_stream):
            fetched = fetch(name)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        with torch.cuda.stream(self.decode_stream):
            self.decode_stream.wait_event(copied)
            _in_use_on(self.decode_stream, fetched)
            layer = decode(fetched)
            ready = torch.cuda.Event()
            ready.record(self.decode_stream)
        return layer, ready

    def _hand_over(self, layer: DeviceLayer, ready: torch.cuda.Event | None) -> DeviceLayer:
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            _in_use_on(compute, layer)
        return layer

    def stream(self, names: Sequence[str], fetch: Fetch, decode: Decode) -> Iterator[DeviceLayer]:
        names = list(names)
        # Decided once a pass: a unit that loaded faster than a hand-over loads in turn (never on CUDA).
        inline = [self._load_s.get(name, math.inf) < INLINE_BELOW_S for name in names]
        pending: dict[int, Future] = {}
        # CUDA: an event after each unit's compute, recorded once the consumer has issued it (asks for the next).
        computed: dict[int, torch.cuda.Event] = {}
        submitted = 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        pool = self._pool

        def fill() -> None:
            nonlocal submitted
            while submitted < len(names) and len(pending) < self.layers_ahead:
                if not inline[submitted]:
                    freed = computed.get(submitted - self.layers_ahead - 1)
                    pending[submitted] = pool.submit(self._load, fetch, decode, names[submitted], freed)
                submitted += 1

        try:
            fill()
            for i, name in enumerate(names):
                layer, ready = self._load(fetch, decode, name) if inline[i] else pending.pop(i).result()
                fill()  # the next `depth` worker loads now run while layer i computes
                yield self._hand_over(layer, ready)
                if ready is not None:
                    computed[i] = torch.cuda.Event(blocking=self.cfg.blocking_wait)
                    computed[i].record(torch.cuda.current_stream(self.device))
        finally:
            for future in pending.values():  # a pass abandoned midway: nothing keeps loading for it
                future.cancel()


def _in_use_on(stream: torch.cuda.Stream, layer: DeviceLayer) -> None:
    """Mark `layer`'s device tensors as read on `stream`: they were allocated on another stream, and without
    this the allocator could hand their memory to the next prefetch while `stream` still reads them.

    Once per allocation, not per tensor: the allocator tracks blocks, and a packed layer's 30 tensors (4-bit) are
    views of one. Each call is an op on the worker, whose Python shares the GIL with the compute's."""
    marked: set[int] = set()
    for t in layer.weights.values():
        if t.is_cuda:  # not a table left on the host for its rows (the pipeline's `looks_up_on_host`)
            block = t.untyped_storage().data_ptr()
            if block not in marked:
                marked.add(block)
                t.record_stream(stream)
