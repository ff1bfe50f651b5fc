"""python -m harness.ab: A and B interleaved round by round under one parent run; B over A with its interval and
verdict, within the noise for A against A and `slower` for a known slowdown (on a fake job's clock); bad input
refused before any job."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness import ab
from harness.measurement.run_report import RunReport


def fake_jobs(monkeypatch: pytest.MonkeyPatch, b_slowdown: float, seed: int = 0) -> list[tuple[str, str]]:
    """run_job replaced by a job whose per-token time is drawn on a noisy machine (5% spread), B's `b_slowdown`
    times A's; returns the (side, round) of each call, in order."""
    rng, calls = random.Random(seed), []

    def run_job(cfg, resolved, *, choices, overrides, parent_run_id, run_name, console, tags):  # noqa: ANN001, ANN202
        calls.append((tags["ab.side"], tags["ab.round"]))
        base = 0.1 * (b_slowdown if tags["ab.side"] == "B" else 1.0)
        return RunReport(tpot_s=base * rng.lognormvariate(0, 0.05), ttft_s=0.5, decode_tokens_per_s=1 / base)

    monkeypatch.setattr("harness.job.run.run_job", run_job)
    return calls


def test_a_against_a_is_within_noise_and_rounds_alternate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = fake_jobs(monkeypatch, b_slowdown=1.0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ab.parse(["--a", "kv_cache=device", "--b", "kv_cache=device", "--rounds", "4",
                     f"tracking.uri={uri}", f"paths.outputs={tmp_path}"])
    ratios = ab.run_ab(args, ab.Console(quiet=True))
    assert calls == [(side, str(r)) for r in range(1, 5) for side in ("A", "B")], "A then B, round by round"
    assert ratios["tpot_s"].verdict == "within_noise" and ratios["tpot_s"].interval.covers(1.0)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    assert parent.info.status == "FINISHED" and parent.data.tags["ab.verdict"] == "within_noise"
    assert parent.data.metrics["ab_ratio_ci95_low"] <= 1 <= parent.data.metrics["ab_ratio_ci95_high"]
    assert parent.data.params["ab.b"] == "kv_cache=device"


def test_a_known_slowdown_is_slower_with_an_interval_above_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_jobs(monkeypatch, b_slowdown=1.5, seed=1)
    args = ab.parse(["--a", "kv_cache=device", "--b", "kv_cache=none", "--rounds", "3", "tracking.enabled=false",
                     f"paths.outputs={tmp_path}"])
    ratios = ab.run_ab(args, ab.Console(quiet=True))
    assert ratios["tpot_s"].verdict == "slower" and ratios["tpot_s"].interval.low > 1
    assert ratios["decode_tokens_per_s"].verdict == "slower", "fewer tokens a second: slower, though the ratio < 1"
    assert ratios["ttft_s"].verdict == "within_noise"


@pytest.mark.parametrize(("argv", "message"), [
    (["--a", "cache=ram", "--b", "cache=tape"], "side B's configuration is refused .B: 'cache=tape'.: .*tape"),
    (["--a", "cache=ram", "--b", "cache=disk", "--rounds", "1"], "--rounds 1: an interval over rounds needs at least"),
    (["--a", "workload.max_new_tokens=0", "--b", "cache=disk"], "side A's configuration is refused"),
])
def test_bad_input_is_refused_before_any_job(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_jobs(monkeypatch, b_slowdown=1.0)
    with pytest.raises(SystemExit, match=message):
        ab.run_ab(ab.parse([*argv, f"paths.outputs={tmp_path}"]), ab.Console(quiet=True))
    assert calls == [] and not (tmp_path / "mlflow.db").exists()


def test_an_ab_of_two_real_jobs_logs_its_children_under_the_parent(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert ab.main(["--a", "kv_cache=device", "--b", "kv_cache=none", "--rounds", "2", "workload.max_new_tokens=4",
                    "probe.enabled=false", f"tracking.uri={uri}", f"paths.outputs={tmp_path}"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["A #1", "A #2", "B #1", "B #2"]
    assert {r.data.params["kv_cache"] for r in children if r.data.tags["ab.side"] == "B"} == {"none"}
    assert parent.data.tags["ab.verdict"] in ("faster", "slower", "within_noise") and "ab_ratio" in parent.data.metrics


def test_two_commits_run_apart_each_job_tagged_with_its_commit(tmp_path: Path) -> None:
    from harness.checkouts import resolve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    head = resolve("HEAD")
    ratios = ab.run_ab(ab.parse(["--a", "", "--b", "", "--a-rev", "HEAD", "--b-rev", head, "--rounds", "2",
                                 "workload.max_new_tokens=3", "probe.enabled=false", f"tracking.uri={uri}",
                                 f"paths.outputs={tmp_path}"]), ab.Console(quiet=True))
    assert ratios["tpot_s"] is not None
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["A #1", "A #2", "B #1", "B #2"]
    assert {r.data.tags["ab.rev"] for r in children} == {head} and parent.data.params["ab.b_rev"] == head
    assert all(r.info.status == "FINISHED" and "tpot_s" in r.data.metrics for r in children)


def test_a_revision_that_names_no_commit_or_has_no_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="'no-such-commit-x' names no commit"):
        ab.run_ab(ab.parse(["--a", "", "--b", "", "--b-rev", "no-such-commit-x", f"paths.outputs={tmp_path}"]),
                  ab.Console(quiet=True))
    with pytest.raises(SystemExit, match="read each job's figures back from MLflow"):
        ab.run_ab(ab.parse(["--a", "", "--b", "", "--b-rev", "HEAD", "tracking.enabled=false",
                            f"paths.outputs={tmp_path}"]), ab.Console(quiet=True))
    assert not (tmp_path / "mlflow.db").exists()
