"""The schema of the sections that predict a run instead of running it: the probe, the plan and the advisor.

Part of the config schema (harness/config.py's `Config` holds them); apart only to keep each module short.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.checks import check_choice, check_positive

# What the advisor ranks by: a sequence's seconds per token, or the batch's tokens per second.
OBJECTIVES = ("latency", "throughput")


@dataclass
class ProbeConfig:
    # Measure the links (disk, host copy, H2D, dequant), a decoder layer's compute and a streamed layer's cost once
    # per machine and device, then reuse; they price the plan (`plan_predicted_s`) and the floor (`floor_s`).
    enabled: bool = True
    refresh: bool = False
    # Bytes moved per link measurement: large enough to leave the caches behind.
    size_mib: int = 256
    # A cached measurement older than this many days is measured again: a machine's load, drivers and disks change.
    max_age_days: float = 7.0

    def __post_init__(self) -> None:
        check_positive("probe.size_mib", self.size_mib)
        check_positive("probe.max_age_days", self.max_age_days)


@dataclass
class PlanConfig:
    # Print the streamed run's plan (resident and streamed units under vram.cap_gib, bytes per pass, the per-token
    # time this machine's probe predicts, whether it fits) from the geometry and the codec alone, then exit:
    # no checkpoint weights, no split, no run, no MLflow run.
    only: bool = False


@dataclass
class AdviseConfig:
    # `python -m harness.advise` only. latency: rank by predicted seconds per token; throughput: by tokens per
    # second over the batch (workload.batch_size sequences a pass).
    objective: str = "latency"
    # Leave out the compressions whose top-1 agreement with the uncompressed model, measured on this model, is
    # below this (a fraction, e.g. 0.95); null: keep every compression.
    min_top1: float | None = None
    # Run this many of the ranked configurations (the best, the seed's, and evenly spaced ranks down to the
    # slowest that fits) as one MLflow sweep, and print predicted beside measured; 0: rank only.
    verify: int = 0
    # Ranked rows printed, beside today's default configuration and the seed's.
    top: int = 10

    def __post_init__(self) -> None:
        check_choice("advise.objective", self.objective, OBJECTIVES)
        check_positive("advise.verify", self.verify, allow_zero=True)
        check_positive("advise.top", self.top)
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ValueError(f"advise.min_top1={self.min_top1} is not a fraction: give a value in 0-1, or null")
