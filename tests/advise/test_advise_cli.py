"""`python -m harness.advise` in a subprocess: it ranks the tiny model's configurations and writes the ranking;
with advise.verify it runs the picks as one MLflow sweep whose parent holds the ranking and whose children log the
advisor's prediction beside their measured time; what it cannot do is refused before anything is measured."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from harness.advise.space import verify_picks

ROOT = Path(__file__).resolve().parents[2]


def advise(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "harness.advise", f"paths.outputs={tmp / 'outputs'}", "probe.size_mib=16", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def test_the_ranking_of_the_tiny_model_and_its_verify_sweep(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    proc = advise(
        tmp_path, "cache=ram", "kv_cache=device", "residency=none", "advise.verify=3", "advise.top=3",
        "workload.max_new_tokens=4", "workload.stop_at_eos=false", "bench.repeats=1", "reference.enabled=false",
        "quality.enabled=false", "tracking.experiment=advise",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (ranking_csv,) = (tmp_path / "outputs" / "runs").rglob("ranking.csv")
    ranked = list(csv.DictReader(ranking_csv.open()))
    assert len(ranked) == 3 * 2, "compression x prefetch: the other groups were chosen on the command line"
    seconds = [float(row["predicted_s"]) for row in ranked]
    assert seconds == sorted(seconds) and all(s > 0 for s in seconds)
    assert {row["note"] for row in ranked} >= {"default", "seed"}
    assert "Spearman rank correlation, predicted vs measured:" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("advise")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = parents
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ranking.csv", "ranking.md"}
    assert "advise_spearman" in parent.data.metrics
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        metrics = child.data.metrics
        assert {"advise_predicted_s", "advise_rank", "plan_predicted_s", "tpot_s"} <= set(metrics)
        rank = int(metrics["advise_rank"])
        assert metrics["advise_predicted_s"] == float(ranked[rank - 1]["predicted_s"])
        assert child.data.params["compression"] == ranked[rank - 1]["compression"]
    # The best, the seed's and the slowest.
    (seed,) = [int(row["rank"]) for row in ranked if "seed" in row["note"]]
    expected = {rank + 1 for rank in verify_picks(len(ranked), seed - 1, 3)}
    assert {int(c.data.metrics["advise_rank"]) for c in children} == expected
    assert {1, seed, len(ranked)} <= expected


def test_what_the_advisor_cannot_do_is_refused_before_measuring(tmp_path: Path) -> None:
    for args, said in (
        (("runner=accelerate",), "runner=accelerate has none"),
        (("decoding=speculative",), "the advisor prices greedy decoding"),
        (("advise.verify=2", "tracking.enabled=false"), "advise.verify runs its picks as an MLflow sweep"),
        (("advise.objective=fastest",), "advise.objective"),
    ):
        proc = advise(tmp_path, *args)
        assert proc.returncode != 0 and said in proc.stderr, (args, proc.stderr[-2000:])
    assert not (tmp_path / "outputs" / "probe").exists(), "nothing was measured"
