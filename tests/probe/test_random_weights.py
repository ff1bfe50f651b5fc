"""harness.probe.compute.random_weights: the probes' weights are finite, drawn at the config's initializer range,
norms are ones, and a weight larger than a tile repeats one drawn tile instead of drawing every element."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from harness.probe import compute


def test_weights_are_drawn_finite_at_the_initializer_range_and_norms_are_ones() -> None:
    config = LlamaConfig(initializer_range=0.02)
    weights = compute.random_weights(
        {"w": torch.Size([300, 200]), "input_layernorm.norm.weight": torch.Size([200])}, config, torch.float32,
        torch.device("cpu"),
    )
    assert torch.isfinite(weights["w"]).all() and abs(weights["w"].std().item() - 0.02) < 0.002
    assert torch.equal(weights["input_layernorm.norm.weight"], torch.ones(200))


def test_a_weight_larger_than_a_tile_repeats_the_drawn_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "_TILE_ELEMENTS", 1000)
    (weight,) = compute.random_weights(
        {"w": torch.Size([25, 100])}, LlamaConfig(), torch.float32, torch.device("cpu")
    ).values()
    flat = weight.view(-1)
    assert torch.equal(flat[1000:2000], flat[:1000]) and torch.equal(flat[2000:], flat[:500]), "the tail too"
    assert len(set(flat[:1000].tolist())) > 900, "the tile itself is drawn, not filled"
