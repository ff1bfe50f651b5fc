"""The plan of a streamed run, before it runs: what stays resident, what streams, the bytes a pass moves,
and the per-token time the probe's link rates predict for them; after the run, the measured time beside it.

The same link arithmetic as the floor (`floor.link_floor`), on predicted bytes instead of measured
ones, and summed rather than overlapped when nothing loads ahead (prefetch=off runs its stages in turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.config import ProbeConfig, WorkloadConfig
from harness.measurement.units import format_metric
from harness.measurement.vram import decoded_bytes
from harness.runners.layerbench.floor import link_floor, pass_seq_len
from harness.runners.layerbench.setup import Setup
from strategies.cache.configs import CacheConfig


@dataclass
class Plan:
    resident: list[str]
    streamed: list[str]
    read_bytes_per_pass: float
    h2d_bytes_per_pass: float
    predicted_s: float
    limiting: str
    # The stored size of the units a pass streams (all but the resident ones, a shared file once), whatever the
    # cache: what a pass would read were every unit read from storage.
    stream_bytes_per_pass: float = 0.0
    # Each link's predicted seconds per token (floor.LINKS), whose slowest (or sum) is `predicted_s`.
    per_link_s: dict[str, float] = field(default_factory=dict)

    def describe(self, bytes_held: int) -> str:
        layers = sum(u.startswith("layers.") for u in self.resident)
        total = layers + sum(u.startswith("layers.") for u in self.streamed)
        others = [u for u in self.resident if not u.startswith("layers.")]
        return (
            f"{layers} of {total} decoder layers resident{' + ' + ', '.join(others) if others else ''} "
            f"({format_metric('resident_bytes', bytes_held)}); {len(self.streamed)} units stream, "
            f"{format_metric('read_bytes_per_pass', self.read_bytes_per_pass)} read per pass; predicted "
            f"{format_metric('plan_predicted_s', self.predicted_s)} per token (limited by {self.limiting})"
        )


def make_plan(
    setup: Setup, probe: ProbeConfig, cache: CacheConfig, workload: WorkloadConfig, probe_dir: Path,
    kept_mapping_bytes_per_s: float | None = None,
) -> Plan:
    """What stays, what streams, and the per-token time the probe's rates (cached in `probe_dir`) predict."""
    layout, pipeline = setup.layout, setup.pipeline
    resident = setup.residency.units
    streamed = [u for u in layout.units if u not in resident]
    # A table looked up on the host stays there, and a rereading cache reads only its rows (left out: a few pages).
    whole = [u for u in streamed if not pipeline.looks_up_on_host(u)]
    read = float(layout.files_bytes(whole)) if pipeline.cache.rereads else 0.0  # a shared file: once a pass
    h2d = 0.0 if setup.device.type == "cpu" else float(layout.files_bytes(whole))  # on a CPU, host is device
    # Every unit decodes on every pass, the resident ones too (they stay in their stored form).
    decoded = float(decoded_bytes(setup.config, layout.units))
    n_prompt = max(len(p) for p in setup.prompts)
    floor, *_ = link_floor(
        setup, probe, cache, probe_dir, disk_bytes=read, h2d_bytes=h2d, dequant_bytes=decoded,
        seq_len=pass_seq_len(setup, n_prompt, workload.max_new_tokens), batch=workload.batch_size,
        kept_mapping_bytes_per_s=kept_mapping_bytes_per_s,
    )
    overlapped = pipeline.prefetcher.layers_ahead > 0
    predicted = floor.floor_s if overlapped else sum(floor.per_link_s.values())
    limiting = floor.limiting if overlapped else "the sum of the links"
    return Plan(
        resident, streamed, read, h2d, predicted, limiting, float(layout.files_bytes(streamed)), dict(floor.per_link_s)
    )
