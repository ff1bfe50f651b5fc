"""`advise.verify=N`: N ranked configurations run as one Hydra multirun (one MLflow sweep), and their measured
per-token times set beside the advisor's predictions, with the rank correlation between them.

Each picked configuration becomes an `+experiment=` preset, written into the advisor's job folder and put on Hydra's
search path, so the sweep is an ordinary `python -m harness -m` run: its parent run, its launcher, its jobs' runs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.advise.space import FREE_GROUPS, Priced, job_overrides
from harness.sweep import PARENT_RUN_ID_FILE

# The group the presets are written under, inside the search path's experiment/ folder.
PRESETS = "advise"


@dataclass(frozen=True)
class Verified:
    rank: int  # 1-based
    priced: Priced
    measured_s: float | None  # the child run's tpot_s (None: the job failed or logged none)


def preset_text(choices: dict[str, str], rank: int) -> str:
    lines = [
        "# @package _global_",
        f"# Written by python -m harness.advise: the configuration it ranked {rank}.",
        "defaults:",
        *(f"  - override /{group}: {name!r}" for group, name in choices.items()),
        "  - _self_",
    ]
    return "\n".join(lines).replace("'", '"') + "\n"


def write_presets(folder: Path, ranking: Sequence[Priced], picks: Sequence[int]) -> list[str]:
    """One preset per pick under `folder`/experiment/advise/; returns the `+experiment=` values."""
    target = folder / "experiment" / PRESETS
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for index in picks:
        name = f"rank{index + 1:03d}"
        (target / f"{name}.yaml").write_text(preset_text(ranking[index].choices, index + 1), encoding="utf-8")
        names.append(f"{PRESETS}/{name}")
    return names


def sweep_command(overrides: Sequence[str], names: Sequence[str], presets: Path, sweep_dir: Path) -> list[str]:
    """The multirun: the advisor's own overrides (less the groups the presets choose and the advisor's section),
    each preset a job."""
    return [
        sys.executable, "-m", "harness", "-m", *job_overrides(overrides), f"+experiment={','.join(names)}",
        f"hydra.searchpath=[file://{presets.resolve()}]", f"hydra.sweep.dir={sweep_dir.resolve()}",
    ]


def run_sweep(command: Sequence[str]) -> int:
    """The sweep's exit status; its output goes to this terminal as it runs."""
    return subprocess.run(list(command), check=False).returncode


def collect(
    uri: str, sweep_dir: Path, ranking: Sequence[Priced], picks: Sequence[int], artifacts: Sequence[Path],
) -> tuple[str | None, list[Verified]]:
    """The sweep's parent run id and each pick's measured tpot_s; the ranking's files logged to the parent, and
    `advise_predicted_s` and `advise_rank` to each child."""
    from mlflow.tracking import MlflowClient

    id_file = sweep_dir / PARENT_RUN_ID_FILE
    parent = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
    if parent is None:
        return None, [Verified(i + 1, ranking[i], None) for i in picks]
    client = MlflowClient(uri)
    for path in artifacts:
        client.log_artifact(parent, str(path))
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_choices = {tuple(run.data.params.get(g) for g in FREE_GROUPS): run for run in children}
    verified = []
    for index in picks:
        priced = ranking[index]
        run = by_choices.get(tuple(priced.choices.get(g) for g in FREE_GROUPS))
        measured = run.data.metrics.get("tpot_s") if run is not None else None
        if run is not None:
            client.log_metric(run.info.run_id, "advise_predicted_s", priced.predicted_s)
            client.log_metric(run.info.run_id, "advise_rank", float(index + 1))
        verified.append(Verified(index + 1, priced, measured))
    return parent, verified


# Up to this many picks, Spearman's p-value is counted over every pairing of the measured times with the predicted
# (8! = 40320): the t-distribution scipy's spearmanr otherwise uses is an approximation for large samples, and a
# perfect ranking of five picks gets p ~ 1e-24 from it where the pairings give 2/120.
EXACT_UP_TO = 8


def spearman(verified: Sequence[Verified]) -> tuple[float, float] | None:
    """Spearman's rank correlation between predicted and measured, and its two-sided p-value (exact over every
    pairing up to EXACT_UP_TO picks, scipy's large-sample approximation beyond), over the picks measured; None with
    fewer than three."""
    from scipy.stats import permutation_test, spearmanr

    pairs = [(v.priced.predicted_s, v.measured_s) for v in verified if v.measured_s is not None]
    if len(pairs) < 3:
        return None
    predicted, measured = [p for p, _ in pairs], [m for _, m in pairs]
    result = spearmanr(predicted, measured)
    if len(pairs) > EXACT_UP_TO:
        return float(result.statistic), float(result.pvalue)
    exact = permutation_test(
        (predicted, measured), lambda x, y: spearmanr(x, y).statistic, permutation_type="pairings",
        n_resamples=float("inf"), alternative="two-sided",
    )
    return float(result.statistic), float(exact.pvalue)
