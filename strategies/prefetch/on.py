"""prefetch=on: load the next `depth` layers in a background thread while the current one computes.

Loading (read + decode) runs in one worker thread: file reads and bitsandbytes/torch
kernels release the GIL, so they overlap with compute on the main thread. On CUDA the
worker issues its host-to-device copies and decodes on a stream of its own; compute waits
on an event for its own layer only, never for the whole device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from strategies.layer import DeviceLayer
from strategies.prefetch.configs import PrefetchOnConfig


class PrefetchOn:
    def __init__(self, cfg: PrefetchOnConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.layers_ahead = cfg.depth
        # Streams exist only on CUDA; elsewhere the worker thread alone gives the overlap.
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # One worker for every pass: a pool per pass started and joined a thread each token.
        self._pool: ThreadPoolExecutor | None = None

    def _load(self, load: Callable[[str], DeviceLayer], name: str) -> tuple[DeviceLayer, torch.cuda.Event | None]:
        if self.copy_stream is None:
            return load(name), None
        with torch.cuda.stream(self.copy_stream):
            layer = load(name)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return layer, ready

    def _hand_over(self, layer: DeviceLayer, ready: torch.cuda.Event | None) -> DeviceLayer:
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            # The weights were allocated on the copy stream: without this the allocator could hand
            # their memory to the next prefetch while compute is still reading them.
            for t in layer.weights.values():
                if t.device == self.device:  # not a table left on the host for its rows (`looks_up_on_host`)
                    t.record_stream(compute)
        return layer

    def stream(self, names: Sequence[str], load: Callable[[str], DeviceLayer]) -> Iterator[DeviceLayer]:
        names = list(names)
        pending: deque[Future] = deque()
        submitted = 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        pool = self._pool

        def fill() -> None:
            nonlocal submitted
            while submitted < len(names) and len(pending) < self.layers_ahead:
                pending.append(pool.submit(self._load, load, names[submitted]))
                submitted += 1

        try:
            fill()
            while pending:
                layer, ready = pending.popleft().result()
                fill()  # layers i+1 .. i+depth now load while layer i computes
                yield self._hand_over(layer, ready)
        finally:
            for future in pending:  # a pass abandoned midway: nothing keeps loading for it
                future.cancel()
