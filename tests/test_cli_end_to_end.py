"""`python -m harness` end to end in a subprocess, read back from MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def harness(tmp: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flags = ["-m"] if multirun else []
    # A small link probe: its size only sets how long the measurement takes.
    common = [f"paths.outputs={tmp}", "workload.max_new_tokens=4", "probe.size_mib=16"]
    cmd = [sys.executable, "-m", "harness", *flags, *common, *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def client(tmp: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


def runs(tmp: Path) -> list:
    c = client(tmp)
    exp = c.get_experiment_by_name("layerbench")
    return c.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("cli")
    return tmp, harness(tmp, "cache=disk", "workload.stop_at_eos=false", "reference.enabled=true", "bench.profile=true")


def test_single_run_logs_params_metrics_and_artifacts(single_run) -> None:
    tmp, proc = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time to first token" in proc.stdout
    (run,) = runs(tmp)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for group, choice in {"model": "tiny", "cache": "disk", "compression": "none", "prefetch": "off",
                          "kv_cache": "device"}.items():
        assert params[group] == choice
    assert params["workload.max_new_tokens"] == "4" and params["cache.page_cache"] == "warm"
    # Each choice once, under the group's name: no `cache.name` repeat, no implementation paths.
    assert "cache.name" not in params and not any(k.endswith("_target_") for k in params)
    metrics = run.data.metrics
    for key in ("ttft_s", "tpot_s", "token_latency_p50_s", "token_latency_p90_s", "token_latency_p99_s",
                "decode_tokens_per_s", "peak_rss_bytes", "read_bytes_per_pass", "split_s"):
        assert key in metrics, key
    assert not any(k.startswith("peak_vram") for k in metrics), "no VRAM on CPU: absent, never 0"
    # The same job ran transformers' resident generate: same tokens, and the streaming cost as a ratio.
    assert metrics["reference_tokens_match"] == 1.0 and metrics["agreement_vs_transformers"] == 1.0
    assert "warning.agreement" not in run.data.tags
    assert metrics["tpot_ratio_vs_reference"] == pytest.approx(metrics["tpot_s"] / metrics["reference_tpot_s"])
    assert metrics["kv_bytes_per_token"] > 0 and metrics["split_layer_file_bytes"] > 0
    assert not any(k.startswith("quality_") for k in metrics), "quality runs for compressed models only"
    # The floor: every link's time per token, the slowest named in a tag, and the run's distance from it.
    assert metrics["floor_ratio"] == pytest.approx(metrics["tpot_s"] / metrics["floor_s"])
    links = ("disk", "host_copy", "h2d", "dequant", "compute")
    assert metrics["floor_s"] == max(metrics[f"floor_{link}_s"] for link in links)
    assert run.data.tags["floor.limiting"] in links and "crosscheck_residual" in metrics
    # The link rates describe the machine: tags with units, not metrics repeated in every run.
    assert run.data.tags["link.page_cache_bytes_per_s"].endswith("B/s")
    assert not any(k.startswith("link_") for k in metrics)
    # Named by its one non-default choice; its description carries the key figures with units.
    assert run.info.run_name == "disk"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**disk**: TTFT ") and " s · per token " in note and "vs transformers" in note
    history = sorted(client(tmp).get_metric_history(run.info.run_id, "token_latency_s"), key=lambda m: m.step)
    assert [m.step for m in history] == [2, 3, 4], "steps number the tokens, as token_latency.png does"
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0], "each step at the time its token arrived"
    experiment = client(tmp).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert "cache=disk" in tags["hydra.overrides"] and tags["version.torch"]
    arts = {a.path for a in client(tmp).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "generation.json", "timeline.csv"} <= arts
    gen_path = client(tmp).download_artifacts(run.info.run_id, "generation.json", str(tmp / "dl"))
    gen = json.loads(Path(gen_path).read_text())
    assert len(gen["generated_ids"]) == 4 and gen["prompt_ids"] and isinstance(gen["text"], str)


def test_a_profile_goes_into_the_job_folder_and_the_run(single_run) -> None:
    tmp, proc = single_run
    (run,) = runs(tmp)
    folder = Path(run.data.tags["profile.dir"])
    # Hydra's folder for the job (outputs/runs/<day>/<time>), beside its .hydra/ and its log.
    assert folder.name == "profile" and (folder.parent / ".hydra").is_dir() and folder.is_relative_to(tmp / "runs")
    assert {p.name for p in folder.iterdir()} == {"ops.txt", "trace.json.gz"}
    assert {a.path for a in client(tmp).list_artifacts(run.info.run_id, "profile")} == {
        "profile/ops.txt", "profile/trace.json.gz"}
    assert f"profile: {folder}" in proc.stdout.replace("\n", "")


def test_compressed_run_logs_quality(tmp_path: Path) -> None:
    proc = harness(tmp_path, "compression=4bit", "cache=ram", "quality.max_tokens=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path)
    m = run.data.metrics
    assert 0 <= m["quality_top1_agreement"] <= 1 and m["quality_kl_mean"] >= 0
    assert m["quality_ppl"] > 1 and m["quality_ppl_reference"] > 1 and m["quality_text_tokens"] == 64
    assert run.data.params["compression"] == "4bit" and run.data.params["compression.quant_type"] == "nf4"


def test_writeup_experiment_is_one_sweep_of_the_write_ups_rows(tmp_path: Path) -> None:
    proc = harness(tmp_path, "+experiment=airllm_writeup", "workload.max_new_tokens=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = client(tmp_path)
    exp = c.get_experiment_by_name("airllm_writeup")
    all_runs = c.search_runs([exp.experiment_id])
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(all_runs) == 5 and len(children) == 4
    assert {(r.data.params["compression"], r.data.params["cache"]) for r in children} == {
        ("none", "disk"), ("4bit", "disk"), ("4bit", "ram"), ("none", "ram")
    }
    for r in children:
        assert r.data.params["kv_cache"] == "none" and r.data.params["cache.page_cache"] == "cold"
        assert r.data.metrics["prompt_tokens"] == 8 and r.data.metrics["new_tokens"] == 3
    report = subprocess.run(
        [sys.executable, "-m", "harness.report", "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment",
         "airllm_writeup", "--last-sweep", "--writeup", "--width", "200"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert "1 min 59 s" in report.stdout or "119" in report.stdout


def test_bad_value_fails_before_loading(tmp_path: Path) -> None:
    proc = harness(tmp_path, "workload.max_new_tokens=0")
    assert proc.returncode != 0
    assert "workload.max_new_tokens=0" in proc.stderr and "> 0" in proc.stderr
    assert not (tmp_path / "models").exists(), "nothing is built for an invalid config"


def test_local_model_without_path_is_refused(tmp_path: Path) -> None:
    proc = harness(tmp_path, "model=local")
    assert proc.returncode != 0 and "model.path is required" in proc.stderr


def test_multirun_is_one_parent_with_a_child_per_job_and_a_failed_job_fails_it(tmp_path: Path) -> None:
    # One sweep for both (each sweep costs its imports and a store): the local jobs point at a checkpoint that does
    # not exist, and fail before any heavy work; the tiny model's jobs run.
    missing = tmp_path / "no-such-checkpoint"
    proc = harness(tmp_path, "cache=disk,ram", "model=tiny,local", f"model.path={missing}", multirun=True)
    assert proc.returncode != 0
    all_runs = runs(tmp_path)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and parents[0].info.status == "FAILED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    finished = {c.data.params["cache"] for c in children if c.info.status == "FINISHED"}
    failed = [c for c in children if c.info.status == "FAILED"]
    assert finished == {"disk", "ram"} and len(failed) == 2
    assert all(str(missing) in c.data.tags["failure_reason"] for c in failed), [c.data.tags for c in failed]


def test_cap_failure_in_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """A fake memory probe (the process holds 1 GiB) replaces NVML; the 0.5 GiB job must fail, the other run."""
    code = (
        "import sys, harness.measurement.vram as v\n"
        "class FakeProbe:\n"
        "    def process_bytes(self): return 1 << 30\n"
        "v.default_probe = lambda device: FakeProbe()\n"
        "from harness.__main__ import main, register_configs\n"
        "register_configs()\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, "-m", f"paths.outputs={tmp_path}", "workload.max_new_tokens=3",
           "probe.enabled=false", "vram.cap_gib=0.5,100"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "a failed job makes the sweep exit non-zero"
    all_runs = runs(tmp_path)
    (parent,) = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["vram.cap_gib"]: r for r in all_runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FAILED"
    assert children["0.5"].info.status == "FAILED" and "vram.cap_gib=0.5" in children["0.5"].data.tags["failure_reason"]
    assert children["100.0"].info.status == "FINISHED", "the sweep went on after the failure"
    assert children["100.0"].data.metrics["peak_vram_nvml_bytes"] == 1 << 30
    # Named by what the sweep varies: children by their value, the parent by the sweep's keys and size.
    assert {c.info.run_name for c in children.values()} == {"0.5", "100"}
    assert parent.info.run_name.startswith("sweep vram.cap_gib (2) ")
    # Even a failed sweep's parent compares what finished, timelines on one shared axis included.
    parent_arts = {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.png", "timelines.png"} <= parent_arts
    assert parent.data.tags["mlflow.note.content"].startswith("**Fastest: 100**")
    # Its params: what every job shared, logged as the jobs log theirs; not what the sweep varied.
    shared = parent.data.params
    assert shared["model"] == "tiny" and shared["cache"] == "ram" and shared["workload.max_new_tokens"] == "3"
    assert "vram.cap_gib" not in shared and "cache.name" not in shared
