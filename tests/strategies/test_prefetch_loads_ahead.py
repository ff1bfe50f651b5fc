"""prefetch=on: units load ahead of the compute by its depth, on the CPU and (streams and events faked, or on
CUDA) bounded by the compute depth + 1 back; a unit that loads faster than a hand-over loads in turn."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from strategies.layer import DeviceLayer
from strategies.prefetch.configs import PrefetchOnConfig
from strategies.prefetch.on import INLINE_BELOW_S, PrefetchOn, _in_use_on


@pytest.mark.parametrize(("depth", "blocking_wait"), [(1, False), (2, False), (3, False), (1, True)])
def test_prefetch_on_cuda_starts_a_load_once_the_compute_depth_plus_one_back_is_done(
    depth: int, blocking_wait: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch's bookkeeping, run on the CPU with streams and events faked: which compute each load waits
    for, and whether it spins or sleeps there (prefetch.blocking_wait). (The gpu test below checks what that bound
    does to device memory.)"""
    handed: list[str] = []  # units the consumer has issued compute for, in order
    waits: dict[str, str | None] = {}  # unit loaded -> the unit whose compute its load waited for
    sleeps: list[bool] = []  # per wait: whether its event was made to block rather than spin

    class FakeStream:
        def wait_event(self, event: object) -> None:
            pass

    compute = FakeStream()

    class FakeEvent:
        def __init__(self, **kwargs: object) -> None:
            self.after: str | None = None
            self.blocking = kwargs.get("blocking", False)  # torch.cuda.Event's own default

        def record(self, stream: object = None) -> None:
            if stream is compute:  # on the compute stream: marks the compute issued last
                self.after = handed[-1]

        def synchronize(self) -> None:
            waits[loading.name] = self.after
            sleeps.append(self.blocking)

    loading = threading.local()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth, blocking_wait=blocking_wait), torch.device("cuda"))
    original = prefetcher._load

    def load(fetch, decode, name, freed=None):  # noqa: ANN001, ANN202 (PrefetchOn._load's own signature)
        loading.name = name
        waits.setdefault(name, None)
        return original(fetch, decode, name, freed)

    monkeypatch.setattr(prefetcher, "_load", load)
    names = [f"l{i}" for i in range(8)]
    for _ in range(2):  # a second pass starts afresh: the first is over, its last token read back by the host
        handed.clear()
        waits.clear()
        for layer in prefetcher.stream(names, lambda name: DeviceLayer(name, {}), lambda layer: layer):
            handed.append(layer.name)
        assert handed == names
        assert waits == {name: (names[i - depth - 1] if i > depth else None) for i, name in enumerate(names)}
    assert sleeps and set(sleeps) == {blocking_wait}


def test_a_layer_is_marked_in_use_on_a_stream_once_per_device_allocation() -> None:
    """record_stream is per allocation (the allocator's block), so a packed layer's views need one call, not one
    each: CUDA tensors faked, as the CPU has none."""
    marked: list[int] = []

    class FakeCudaTensor:
        def __init__(self, block: int, is_cuda: bool = True) -> None:
            self.block, self.is_cuda = block, is_cuda

        def untyped_storage(self) -> object:
            return type("Storage", (), {"data_ptr": lambda _: self.block})()

        def record_stream(self, stream: object) -> None:
            marked.append(self.block)

    views = {f"packed.{i}": FakeCudaTensor(0x1000) for i in range(30)}  # a 4-bit layer's stored tensors
    decoded = {f"w{i}": FakeCudaTensor(0x2000 + i) for i in range(7)}  # dequantized, each its own allocation
    table = {"on_host": FakeCudaTensor(0x3000, is_cuda=False)}  # a table looked up on the host: never marked
    _in_use_on(object(), DeviceLayer("layers.00", {**views, **decoded, **table}))
    assert sorted(marked) == [0x1000, *(0x2000 + i for i in range(7))]


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_on_cuda_holds_depth_plus_one_units_on_the_device(depth: int) -> None:
    """Nothing in a CUDA load waits for the device, so without a bound the host would load a whole pass ahead of
    a slow compute, each unit in new memory. Here each unit's compute is a long device sleep."""
    cuda = torch.device("cuda")
    mib = 1 << 20
    stored_bytes, decoded_bytes = 32 * mib, 64 * mib

    def fetch(name: str) -> DeviceLayer:
        return DeviceLayer(name, {"w": torch.empty(stored_bytes, dtype=torch.uint8, device=cuda)})

    def decode(layer: DeviceLayer) -> DeviceLayer:
        layer.weights = {"w": torch.empty(decoded_bytes, dtype=torch.uint8, device=cuda)}
        return layer

    prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth), cuda)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for layer in prefetcher.stream([f"l{i}" for i in range(12)], fetch, decode):
        torch.cuda._sleep(20_000_000)  # milliseconds of device time, microseconds of the host's
        layer.weights.clear()
    torch.cuda.synchronize()
    # Reserved, not allocated: a freed block leaves the allocated count at once, but is reused only once every
    # stream that used it has passed that use, so running ahead shows as new segments.
    peak = torch.cuda.max_memory_reserved() - base
    # depth + 1 units decoded, one more stored while it decodes (and one stored whose decode just finished).
    assert peak <= (depth + 1) * decoded_bytes + 2 * stored_bytes, peak / mib


def test_prefetch_loads_ahead_while_the_consumer_computes() -> None:
    """With depth d, layer i+d is being loaded before the consumer is done with layer i."""
    names = [f"l{i}" for i in range(6)]
    started = {name: threading.Event() for name in names}
    order: list[str] = []

    def load(name: str) -> str:
        started[name].set()
        order.append(f"load {name}")
        return name

    for depth in (1, 2):
        order.clear()
        for event in started.values():
            event.clear()
        prefetcher = PrefetchOn(PrefetchOnConfig(depth=depth), torch.device("cpu"))
        for i, name in enumerate(prefetcher.stream(names, load, lambda fetched: fetched)):
            ahead = names[min(i + depth, len(names) - 1)]
            # Not a timing bound: the worker needs no signal from us to start the next load.
            assert started[ahead].wait(timeout=30), f"depth {depth}: {ahead} not loading while {name} computes"
            order.append(f"use {name}")
        assert [o for o in order if o.startswith("use")] == [f"use {n}" for n in names]


def test_prefetch_loads_a_unit_in_turn_once_it_loads_faster_than_a_hand_over() -> None:
    names = ["fast", "slow", "fast2"]
    where: dict[str, list[str]] = {name: [] for name in names}

    def fetch(name: str) -> str:
        where[name].append(threading.current_thread().name)
        if name == "slow":
            time.sleep(20 * INLINE_BELOW_S)
        return name

    prefetcher = PrefetchOn(PrefetchOnConfig(depth=1), torch.device("cpu"))
    for _ in range(6):
        assert list(prefetcher.stream(names, fetch, lambda fetched: fetched)) == names
    on_worker = {name: [thread.startswith("prefetch") for thread in threads] for name, threads in where.items()}
    # The first pass knows no load times: all go to the worker. Then the fast ones load in turn (mostly: a load
    # the machine happened to pause for goes back to the worker once).
    assert on_worker["slow"] == [True] * 6
    for fast in ("fast", "fast2"):
        assert on_worker[fast][0] and on_worker[fast][1:].count(False) >= 3, on_worker
