"""Run a weightless module skeleton on weights handed to it for one call, and keep none of them.

`torch.func.functional_call` does this too, but rebuilds its parameter mapping on every call, on
every unit of every pass, which costs a small layer a noticeable share of its forward (figures in
docs/findings.md). Here each skeleton's parameter slots are found once; a call puts the tensors in
those slots, runs the module's own forward, and puts the meta placeholders back, so the weights
live no longer than the call.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

# skeleton -> [(owning submodule, attribute, state-dict name, meta placeholder)], found on first use.
_SLOTS: WeakKeyDictionary[nn.Module, list[tuple[nn.Module, str, str, nn.Parameter]]] = WeakKeyDictionary()


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, str, nn.Parameter]]:
    slots = _SLOTS.get(module)
    if slots is None:
        slots = []
        for name, placeholder in module.named_parameters():
            owner, _, attr = name.rpartition(".")
            slots.append((module.get_submodule(owner), attr, name, placeholder))
        _SLOTS[module] = slots
    return slots


def run_with_weights(module: nn.Module, weights: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with `weights` (state-dict names, every parameter, nothing else) in place."""
    slots = _slots(module)
    if len(weights) != len(slots) or any(name not in weights for _, _, name, _ in slots):
        expected = {name for _, _, name, _ in slots}
        raise KeyError(
            f"weights for {type(module).__name__} do not match its parameters: "
            f"missing {sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)}"
        )
    # Straight into _parameters: nn.Module.__setattr__ would insist on nn.Parameter objects.
    for owner, attr, name, _ in slots:
        owner._parameters[attr] = weights[name]
    try:
        return module(*args, **kwargs)
    finally:
        for owner, attr, _, placeholder in slots:
            owner._parameters[attr] = placeholder
