"""The plan of a streamed run, before it runs: what stays resident, what streams, the bytes a pass moves,
the per-token time the cost model predicts (cost.py), and each link's share by the floor's arithmetic
(`floor.link_floor` on predicted bytes); after the run, the measured time beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.config import Config
from harness.measurement.units import format_metric
from harness.measurement.vram import decoded_bytes
from harness.probe.store import mark_stream_stale
from harness.runners.layerbench.cost import (
    SpeculativeCost,
    TokenCost,
    speculative_cost,
    stream_options,
    token_cost,
)
from harness.runners.layerbench.floor import link_floor, pass_seq_len
from harness.runners.layerbench.setup import Setup

# A run off its plan's prediction by more than this share, either way, contradicts the stream probes that priced
# it: the cost model's aim (docs/cost-model.md).
PLAN_TOLERANCE = 0.15


def missed_plan(tpot_s: float | None, predicted_s: float) -> str | None:
    """What is wrong when the per-token time is off the plan's prediction by more than PLAN_TOLERANCE; else None."""
    if tpot_s is None or predicted_s <= 0 or abs(tpot_s / predicted_s - 1) <= PLAN_TOLERANCE:
        return None
    return (
        f"per token {format_metric('tpot_s', tpot_s)} is {tpot_s / predicted_s:.2f}x the plan's "
        f"{format_metric('plan_predicted_s', predicted_s)} (more than {PLAN_TOLERANCE:.0%} off): the stream probes "
        "that priced it will be re-measured on the next run"
    )


def check_plan(setup: Setup, cfg: Config, tpot_s: float | None, predicted_s: float, probe_dir: Path) -> str | None:
    """`missed_plan` for this run; when missed, the stream probes that priced the plan (its options', and the
    draft's, whose steps a speculative plan prices with probes of their own) are marked stale, so the next run
    measures them again."""
    problem = missed_plan(tpot_s, predicted_s)
    if problem is not None:
        mark_stream_stale(setup.device, probe_dir, problem, setup.config, stream_options(cfg))
        if (draft := setup.draft) is not None:
            mark_stream_stale(setup.device, probe_dir, problem, draft.model.config, draft.options)
    return problem


@dataclass
class Plan:
    resident: list[str]
    streamed: list[str]
    read_bytes_per_pass: float
    h2d_bytes_per_pass: float
    # The predicted pass, by the cost model's terms.
    cost: TokenCost
    limiting: str
    # The stored size of the units a pass streams (all but the resident ones, a shared file once), whatever the
    # cache: what a pass would read were every unit read from storage.
    stream_bytes_per_pass: float = 0.0
    # Each link's seconds per token at its probed rate (floor.LINKS): the floor's arithmetic on the plan's bytes.
    per_link_s: dict[str, float] = field(default_factory=dict)
    # decoding=speculative: a round's cost (then `cost` is its verifying pass), and the drafts accepted per pass
    # it is priced at (given, or once the run has measured it).
    speculative: SpeculativeCost | None = None
    accepted_per_pass: float | None = None

    @property
    def predicted_s(self) -> float:
        """Seconds a token: a greedy pass; a speculative round over the tokens it yields, none accepted while the
        acceptance is unknown (the bound)."""
        if self.speculative is None:
            return self.cost.total_s
        return self.speculative.per_token_s(self.accepted_per_pass or 0.0)

    def terms(self) -> dict[str, float]:
        """The prediction's terms, as logged (plan_<term>)."""
        terms = {f"plan_{term}": seconds for term, seconds in vars(self.cost).items()}
        if self.speculative is not None:
            terms["plan_draft_step_s"] = self.speculative.draft_step_s
            terms["plan_draft_prefill_s"] = self.speculative.draft_prefill_s
        return terms

    def describe(self, bytes_held: int) -> str:
        layers = sum(u.startswith("layers.") for u in self.resident)
        total = layers + sum(u.startswith("layers.") for u in self.streamed)
        others = [u for u in self.resident if not u.startswith("layers.")]
        return (
            f"{layers} of {total} decoder layers resident{' + ' + ', '.join(others) if others else ''} "
            f"({format_metric('resident_bytes', bytes_held)}); {len(self.streamed)} units stream, "
            f"{format_metric('read_bytes_per_pass', self.read_bytes_per_pass)} read per pass; predicted "
            f"{format_metric('plan_predicted_s', self.predicted_s)} per token{self._assuming()} "
            f"(limited by {self.limiting})"
        )

    def _assuming(self) -> str:
        spec = self.speculative
        if spec is None:
            return ""
        accepted = "none" if self.accepted_per_pass is None else f"{self.accepted_per_pass:.2f}"
        return (
            f" with {accepted} of {spec.k} drafts accepted a pass (a round: verifying pass "
            f"{format_metric('plan_predicted_s', spec.verify.total_s)} + {spec.sequences * spec.k} draft steps of "
            f"{format_metric('plan_predicted_s', spec.draft_step_s)}; the draft's prefill "
            f"{format_metric('plan_predicted_s', spec.draft_prefill_s)} a sequence)"
        )


def make_plan(setup: Setup, cfg: Config, probe_dir: Path, kept_mapping_bytes_per_s: float | None = None) -> Plan:
    """What stays, what streams, and the per-token time the cost model predicts from the probes cached in
    `probe_dir` (measured there first when missing)."""
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
    workload = cfg.workload
    floor, rates, _, _ = link_floor(
        setup, cfg.probe, cfg.cache, probe_dir, disk_bytes=read, h2d_bytes=h2d, dequant_bytes=decoded,
        seq_len=pass_seq_len(setup, n_prompt, workload.max_new_tokens), batch=workload.batch_size,
        kept_mapping_bytes_per_s=kept_mapping_bytes_per_s,
    )
    spec = None
    if setup.draft is not None:
        spec = speculative_cost(setup, cfg, rates, probe_dir, kept_mapping_bytes_per_s)
        cost = spec.verify
    else:
        cost = token_cost(setup, cfg, rates, probe_dir, kept_mapping_bytes_per_s)
    return Plan(
        resident, streamed, read, h2d, cost, floor.limiting, float(layout.files_bytes(streamed)),
        dict(floor.per_link_s), spec, cfg.decoding.accepted_per_pass,
    )
