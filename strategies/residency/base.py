"""residency: which units stay on the device for the whole run instead of streaming every pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class ResidencyPolicy(Protocol):
    # False: nothing is ever kept resident, so a run has no residency figures to log.
    active: bool

    def choose(self, layers: Sequence[str], others: Sequence[str], unit_bytes: Mapping[str, int],
               budget_bytes: int) -> list[str]:
        """The units to keep resident, given each unit's stored bytes and the device bytes left for them.

        `layers`: the decoder layers in execution order; `others`: the remaining units (norm, lm_head,
        embed), in the order they are worth keeping. Raises ValueError for a request that cannot fit.
        """
        ...
