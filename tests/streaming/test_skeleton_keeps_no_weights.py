"""run_with_weights: a meta skeleton computes with weights handed in for one call, and keeps none."""

from __future__ import annotations

import weakref

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn

from harness.streaming.skeleton import run_with_weights


def skeleton() -> nn.Module:
    with init_empty_weights():
        return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_same_result_as_the_module_holding_its_weights() -> None:
    real = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    weights = {k: v.detach().clone() for k, v in real.state_dict().items()}
    x = torch.randn(2, 4)
    assert torch.equal(run_with_weights(skeleton(), weights, x), real(x))


def test_weights_are_let_go_after_the_call_even_when_it_fails() -> None:
    module = skeleton()
    weights = {k: torch.randn(v.shape) for k, v in module.state_dict().items()}
    alive = weakref.ref(weights["0.weight"])
    run_with_weights(module, weights, torch.randn(2, 4))
    assert all(p.is_meta for p in module.parameters()), "the skeleton is weightless again"
    with pytest.raises(RuntimeError):
        run_with_weights(module, weights, torch.randn(2, 5))  # wrong input width: the forward raises
    assert all(p.is_meta for p in module.parameters())
    del weights
    assert alive() is None, "nothing but the caller held the weights"


def test_missing_or_unexpected_weights_are_named() -> None:
    module = skeleton()
    weights = {k: torch.randn(v.shape) for k, v in module.state_dict().items()}
    weights.pop("1.bias")
    weights["2.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['1.bias'\], unexpected \['2.weight'\]"):
        run_with_weights(module, weights, torch.randn(2, 4))
