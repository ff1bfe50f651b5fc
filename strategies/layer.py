"""What the strategy pipeline hands the runner: one unit's weights on the device, and how they got there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A clock reading: a perf_counter float, or a CUDA event recorded on the stream that did the work.
# Opaque here: only the harness's stage clock turns stamps into seconds.
Stamp = Any


@dataclass
class DeviceLayer:
    """One unit's weights on the compute device, with the stamps and bytes of getting them there."""

    name: str
    weights: dict[str, Any]  # tensor name in the unit's module -> torch.Tensor on the device
    stamps: dict[str, tuple[Stamp, Stamp]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    # Host seconds its fetch and decode took to issue, on whichever thread ran them (waits for room excluded).
    load_issue_s: float = 0.0
