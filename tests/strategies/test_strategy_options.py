"""What the options state about themselves (the job asks; it never compares option names): bad values are
refused, each option says what it holds and costs, and a new lossy option gets its quality pass unasked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import strategies
from harness.job.run import run_job
from strategies.compression.configs import CompressionConfig
from strategies.prefetch.configs import PrefetchOnConfig


def test_bad_strategy_values_are_refused(make_cfg) -> None:
    with pytest.raises(ValueError, match="compression.quant_type='nf3'.*nf4, fp4"):
        make_cfg("compression=4bit", "compression.quant_type=nf3")
    with pytest.raises(ValueError, match="compression.blocksize=100"):
        make_cfg("compression=8bit", "compression.blocksize=100")
    with pytest.raises(ValueError, match="prefetch.depth=0"):
        make_cfg("prefetch=on", "prefetch.depth=0")


def test_options_state_what_they_hold_and_cost() -> None:
    cpu = torch.device("cpu")
    assert strategies.build(PrefetchOnConfig(depth=3), device=cpu).layers_ahead == 3
    assert strategies.build(strategies.option_configs()["prefetch"]["off"](), device=cpu).layers_ahead == 0
    kv = {name: strategies.build(cfg()) for name, cfg in strategies.option_configs()["kv_cache"].items()}
    assert {name: policy.layers_on_device(32) for name, policy in kv.items()} == {
        "none": 1, "device": 32, "offload": 1, "quantized": 32
    }
    assert {name: policy.recomputes_sequence for name, policy in kv.items()} == {
        "none": True, "device": False, "offload": False, "quantized": False
    }
    assert {name: cfg.lossy for name, cfg in strategies.option_configs()["kv_cache"].items()} == {
        "none": False, "device": False, "offload": False, "quantized": True
    }
    codecs = {name: strategies.build(cfg()) for name, cfg in strategies.option_configs()["compression"].items()}
    assert {name: (c.lossy, c.bits) for name, c in codecs.items()} == {
        "none": (False, None), "8bit": (True, 8), "4bit": (True, 4)
    }


@dataclasses.dataclass
class RoundedConfig(CompressionConfig):
    name: str = "rounded"
    _target_: str = f"{__name__}.RoundedCodec"


class RoundedCodec:
    """A lossy option the job has never heard of: weights rounded to multiples of 1/8 at split time."""

    stored_fraction = 0.0
    lossy = True
    bits = None
    split_key = "test-rounded-8"

    def __init__(self, cfg: RoundedConfig) -> None:
        self.cfg = cfg

    def stores_plain(self, layer: str) -> bool:
        return True  # rounded, but stored as the weights it decodes to

    def encode(self, layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (t.float() * 8).round().div(8).to(t.dtype) if t.dim() == 2 else t for k, t in tensors.items()}

    def decode(self, layer: str, stored: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return stored


def test_a_new_lossy_option_gets_its_quality_pass_without_a_job_edit(make_cfg) -> None:
    cfg = dataclasses.replace(make_cfg("workload.max_new_tokens=3", "probe.enabled=false"), compression=RoundedConfig())
    report = run_job(cfg, {}, choices={"model": "tiny", "compression": "rounded"}, overrides=[])
    assert report.quality_kl_mean is not None and report.quality_kl_mean > 0
    assert report.quality_ppl is not None and report.quality_ppl_reference is not None
