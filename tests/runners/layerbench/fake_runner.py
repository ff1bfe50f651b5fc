"""A LayerbenchRunner on a fake Setup, as `load` leaves it: for tests of what `annotate` adds to a report."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from harness.config_planning import ProbeConfig
from harness.runners.layerbench import runner as layerbench_runner
from harness.runners.layerbench.plan import Plan
from strategies.cache.configs import RamCacheConfig
from strategies.compression.configs import NoCompressionConfig
from strategies.kv_cache.configs import DeviceKVCacheConfig
from strategies.prefetch.configs import PrefetchOffConfig

CPU = torch.device("cpu")


def fake_setup(recomputes_sequence: bool = False, draft: object | None = None) -> SimpleNamespace:
    """The parts of a Setup the floor and `annotate` read, without a checkpoint."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=128, dtype="bfloat16")
    return SimpleNamespace(
        device=CPU,
        config=config,
        model=SimpleNamespace(kv_policy=SimpleNamespace(recomputes_sequence=recomputes_sequence), graphs=None),
        pipeline=SimpleNamespace(codec=SimpleNamespace(bits=None), cache=SimpleNamespace(bytes_held=0)),
        residency=SimpleNamespace(units=[], bytes=0, metrics=lambda layers: {}),
        split_metrics=lambda: {},
        layout=SimpleNamespace(dir=Path("split")),
        split_stats=SimpleNamespace(fresh=False),
        draft=draft,
        planned_device_bytes=0,
    )


def fake_runner(
    setup: SimpleNamespace, outputs_dir: Path, plan: Plan | None = None
) -> layerbench_runner.LayerbenchRunner:
    """A LayerbenchRunner of `setup` whose outputs go to `outputs_dir`, planned by `plan`, with the default
    options (RAM, no compression, no prefetch, KV cache on the device)."""
    runner = object.__new__(layerbench_runner.LayerbenchRunner)
    runner.cfg = SimpleNamespace(
        probe=ProbeConfig(), cache=RamCacheConfig(), compression=NoCompressionConfig(), prefetch=PrefetchOffConfig(),
        kv_cache=DeviceKVCacheConfig(), workload=SimpleNamespace(batch_size=1),
    )
    runner.outputs_dir = outputs_dir
    runner.setup = setup
    runner.own_links = {}
    runner.plan = plan
    runner.vram = SimpleNamespace(enforced=False)
    return runner
