"""residency options' configs: plain dataclasses, so composing a config imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from strategies.checks import check_choice, check_positive

PLACEMENTS = ("spread", "first", "last")


@dataclass
class ResidencyConfig:
    name: str = MISSING
    _target_: str = MISSING


@dataclass
class NoResidencyConfig(ResidencyConfig):
    name: str = "none"
    _target_: str = "strategies.residency.none.NoResidency"


@dataclass
class AutoResidencyConfig(ResidencyConfig):
    name: str = "auto"
    _target_: str = "strategies.residency.auto.AutoResidency"
    # Decoder layers kept on the device for the whole run; null: as many as the budget holds.
    # A forced count that does not fit is refused before anything loads.
    layers: int | None = None
    # Which decoder layers stay: spread evenly (a streamed layer then sits between resident ones, whose
    # compute hides its load when prefetch=on), the first ones, or the last ones.
    placement: str = "spread"

    def __post_init__(self) -> None:
        check_choice("residency.placement", self.placement, PLACEMENTS)
        if self.layers is not None:
            check_positive("residency.layers", self.layers, allow_zero=True)
