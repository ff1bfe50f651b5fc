"""residency=none: every unit streams on every pass (the seed's design)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from strategies.residency.configs import NoResidencyConfig


class NoResidency:
    active = False

    def __init__(self, cfg: NoResidencyConfig) -> None:
        self.cfg = cfg

    def choose(self, layers: Sequence[str], others: Sequence[str], unit_bytes: Mapping[str, int],
               budget_bytes: int) -> list[str]:
        return []
