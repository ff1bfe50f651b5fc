"""The configurations the advisor weighs: every option of the groups a command line leaves free, each priced by the
plan a run of it would print (plan_only.predict and the cost model), or refused with the reason a run would give.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import strategies
from harness.config import Config, explicit_groups

# The groups the advisor varies: how the weights reach the device, and what stays there. Decoding stays greedy:
# a speculative run's price needs its draft built and its acceptance, which no probe measures.
FREE_GROUPS = ("cache", "compression", "prefetch", "kv_cache", "residency")
# Today's default configuration (conf/config.yaml) and the seed's (the write-up's AirLLM run: 4-bit, layers in RAM,
# prefetch on, nothing resident), shown beside the ranking whatever their rank.
DEFAULT = {"cache": "ram", "compression": "none", "prefetch": "off", "kv_cache": "device", "residency": "none"}
SEED = {"cache": "ram", "compression": "4bit", "prefetch": "on", "kv_cache": "device", "residency": "none"}


@dataclass(frozen=True)
class Priced:
    """A configuration that fits, and its plan's figures."""

    choices: dict[str, str]
    predicted_s: float  # per pass: a token of every sequence of the batch
    batch: int
    bytes_per_pass: float  # the stored bytes a pass streams
    peak_bytes: float  # the device memory the run plans for: context, streaming's need, the resident units
    limiting: str  # the link whose floor is slowest
    resident_layers: int

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.predicted_s


@dataclass(frozen=True)
class Refused:
    """A configuration that cannot run, and why, with the numbers."""

    choices: dict[str, str]
    reason: str


def label(choices: dict[str, str]) -> str:
    return " ".join(f"{group}={choices[group]}" for group in FREE_GROUPS if group in choices)


def overrides_for(choices: dict[str, str]) -> list[str]:
    return [f"{group}={name}" for group, name in choices.items()]


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides a job of a configuration keeps: all but the free groups' (the configuration
    chooses those) and the advisor's own section."""
    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    return [o for o in overrides if key(o) not in FREE_GROUPS and not key(o).startswith("advise.")]


def space(cfg: Config, task_overrides: Sequence[str]) -> list[dict[str, str]]:
    """Every combination of the free groups' options; a group the command line chose stays at its choice."""
    fixed = explicit_groups(task_overrides)
    options = strategies.option_configs()
    axes = [
        [getattr(cfg, group).name] if group in fixed else sorted(options[group])
        for group in FREE_GROUPS
    ]
    return [dict(zip(FREE_GROUPS, combo, strict=True)) for combo in itertools.product(*axes)]


def price(cfg: Config, choices: dict[str, str]) -> Priced | Refused:
    """`cfg` (composed with `choices`) priced by its plan, as `plan.only=true` prints it; a configuration a run
    would refuse (over the cap, a KV cache the model cannot have, a split that cannot exist) is Refused."""
    from harness.runners.layerbench.plan import make_plan
    from harness.runners.layerbench.plan_only import PlanRefused, predict

    outputs_dir = Path(cfg.paths.outputs)
    try:
        setup, _ = predict(cfg, outputs_dir)
    except (PlanRefused, ValueError) as exc:
        return Refused(choices, str(exc))
    plan = make_plan(setup, cfg, outputs_dir / "probe")
    return Priced(
        choices=choices,
        predicted_s=plan.predicted_s,
        batch=len(setup.prompts),
        bytes_per_pass=plan.stream_bytes_per_pass,
        peak_bytes=float(setup.planned_device_bytes),
        limiting=plan.limiting,
        resident_layers=sum(u.startswith("layers.") for u in setup.residency.units),
    )


def price_all(
    combos: Sequence[dict[str, str]], compose: Callable[[dict[str, str]], Config],
    progress: Callable[[int, dict[str, str]], None] | None = None,
) -> tuple[list[Priced], list[Refused]]:
    """Each combination composed (`compose`) and priced; a composition the schema refuses is Refused too."""
    priced, refused = [], []
    for index, choices in enumerate(combos):
        if progress is not None:
            progress(index, choices)
        try:
            cfg = compose(choices)
        except ValueError as exc:
            refused.append(Refused(choices, str(exc)))
            continue
        result = price(cfg, choices)
        (priced if isinstance(result, Priced) else refused).append(result)  # type: ignore[arg-type]
    return priced, refused


def ranked(priced: Sequence[Priced], objective: str) -> list[Priced]:
    """Fastest first: by predicted seconds per token (latency), or by tokens per second (throughput)."""
    if objective == "throughput":
        return sorted(priced, key=lambda p: -p.tokens_per_s)
    return sorted(priced, key=lambda p: p.predicted_s)


def seed_rank(ranking: Sequence[Priced]) -> int | None:
    """Where the seed's configuration ranks, if it fits (and the command line left its groups free)."""
    return next((i for i, p in enumerate(ranking) if all(p.choices.get(g) == v for g, v in SEED.items())), None)


def verify_picks(n: int, seed: int | None, count: int) -> list[int]:
    """The ranks (0-based, of `n`) to verify: the best, the seed's (`seed`, when it fits), the slowest, and evenly
    spaced ranks between, `count` in all (all `n` when fewer fit)."""
    count = min(count, n)
    if count <= 0:
        return []
    picks = {0}
    if seed is not None and count > 1:
        picks.add(seed)
    spaced = [round(j * (n - 1) / max(1, count - 1)) for j in range(count - 1, 0, -1)]  # the slowest first
    for rank in [*spaced, *range(n - 1, 0, -1)]:  # then any other, should spaced ranks coincide
        if len(picks) == count:
            break
        picks.add(rank)
    return sorted(picks)
