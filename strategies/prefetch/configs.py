"""prefetch options' configs: plain dataclasses, so composing a config imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from strategies.checks import check_positive


@dataclass
class PrefetchConfig:
    name: str = MISSING
    _target_: str = MISSING

    @property
    def layers_ahead(self) -> int:
        """Layers loaded ahead of the one computing."""
        return 0


@dataclass
class PrefetchOffConfig(PrefetchConfig):
    name: str = "off"
    _target_: str = "strategies.prefetch.off.PrefetchOff"


@dataclass
class PrefetchOnConfig(PrefetchConfig):
    name: str = "on"
    _target_: str = "strategies.prefetch.on.PrefetchOn"
    # Layers loaded ahead of the one computing. Each costs one layer of device memory.
    depth: int = 1
    # CUDA: how the worker waits for the compute `depth + 1` units back before a load. false: CUDA's default, which
    # spins on a core (as it does whenever the process has fewer contexts than cores); true: it sleeps until woken
    # (a blocking-sync event), leaving the core to the thread issuing the compute, for a wake-up's latency.
    blocking_wait: bool = False

    def __post_init__(self) -> None:
        check_positive("prefetch.depth", self.depth)

    @property
    def layers_ahead(self) -> int:
        return self.depth
