"""Peer runners (runner=transformers|accelerate|airllm): the same workload, the same ruler, the same tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console
from transformers import LlamaConfig

from harness.checkpoints.generated import ensure_checkpoint
from harness.config import OPTION_GROUPS, Config, RunnerUnavailable, explicit_groups
from harness.job.run import run_job
from harness.measurement.memory import peak_rss_bytes, reset_peak_rss
from harness.measurement.vram import VramCapExceeded
from harness.runners.accelerate import offload_device_map
from harness.runners.airllm import AirLLMRunner
from harness.runners.base import runner_class
from harness.runners.hf import LoadRequest
from harness.runners.layerbench.runner import LayerbenchRunner
from harness.runners.transformers import TransformersRunner, checkpoint_bytes
from strategies.cache.configs import DiskCacheConfig, RamCacheConfig

ROOT = Path(__file__).resolve().parents[2]
LAYERBENCH_DEFAULTS = {"cache": "ram", "compression": "none", "prefetch": "off", "kv_cache": "device"}
CACHES = {"disk": DiskCacheConfig(), "ram": RamCacheConfig()}


def options(make_cfg: Callable[..., Config], runner: str, *chosen: str) -> dict[str, Any]:
    """The option, by group, that `runner` runs when the command line chose `chosen`; its own extra need not be
    installed (Config.runner_options reads only what the runner class declares)."""
    cfg = make_cfg(f"runner={runner}", *chosen)
    return cfg.runner_options(runner_class(cfg).supports, explicit_groups(list(chosen)))


def names(make_cfg: Callable[..., Config], runner: str, *chosen: str) -> dict[str, str]:
    return {group: option.name for group, option in options(make_cfg, runner, *chosen).items()}


def test_a_peer_runs_its_own_way_unless_told_and_refuses_by_name_what_it_cannot_do(
    make_cfg: Callable[..., Config],
) -> None:
    # Nothing chosen on the command line: each peer's own way, not layerbench's defaults (cache=ram, ...).
    assert names(make_cfg, "accelerate") == {
        "decoding": "greedy", "cache": "disk", "compression": "none", "prefetch": "off", "kv_cache": "device"}
    assert names(make_cfg, "airllm")["prefetch"] == "on"
    # A group the peer has no counterpart for is not among its options (nor, so, its params).
    assert "cache" not in names(make_cfg, "transformers")
    # layerbench runs every option as configured: the config's own option objects.
    defaults = make_cfg()
    assert LayerbenchRunner.check(defaults, set()) == {g: getattr(defaults, g) for g in OPTION_GROUPS}
    # Chosen and honoured; a peer reads the option object, not its name.
    assert options(make_cfg, "accelerate", "cache=ram")["cache"].rereads is False
    assert options(make_cfg, "airllm", "compression=4bit")["compression"].bits == 4
    # Chosen and impossible: refused, naming the runner and the option.
    cases = [
        ("transformers", "cache=disk", r"runner=transformers has no cache strategy.*cache=disk"),
        ("airllm", "kv_cache=offload", r"runner=airllm cannot run kv_cache=offload.*device\|none"),
        ("accelerate", "compression=4bit", r"runner=accelerate cannot run compression=4bit"),
        ("accelerate", "prefetch=on", r"runner=accelerate cannot run prefetch=on"),
    ]
    for runner, chosen, match in cases:
        with pytest.raises(RunnerUnavailable, match=match):
            options(make_cfg, runner, chosen)
    # Decoding counts as chosen even where a preset, not the command line, chose it: which tokens come out is
    # never left to a runner's default.
    with pytest.raises(RunnerUnavailable, match=r"runner=transformers cannot run decoding=speculative: it supports"):
        TransformersRunner.check(make_cfg("runner=transformers", "decoding=speculative"), explicit_groups([]))


def test_explicit_groups_come_from_the_overrides() -> None:
    assert explicit_groups(["runner=accelerate", "cache=ram", "+kv_cache=none", "workload.prompt=a=b"]) == {
        "cache", "kv_cache", "decoding"}
    assert explicit_groups(["cache.page_cache=cold"]) == {"decoding"}


def test_a_missing_extra_names_it_and_a_sweep_skips_the_runner(
    make_cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airllm" else real_find_spec(
        name, *a))
    with pytest.raises(RunnerUnavailable, match=r"pip install 'layerbench\[airllm\]'"):
        AirLLMRunner.check(make_cfg("runner=airllm"), set())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = ("tracking.enabled=true", f"tracking.uri={uri}", "runner=airllm")
    with pytest.raises(RunnerUnavailable, match="layerbench\\[airllm\\]"):
        run_job(make_cfg(*tracked), {}, choices={"model": "tiny", "runner": "airllm"}, overrides=["runner=airllm"])
    skipped = run_job(make_cfg(*tracked, "runner.skip_unavailable=true"), {},
                      choices={"model": "tiny", "runner": "airllm"}, overrides=["runner=airllm"])
    assert skipped is None
    # Refused or skipped before its run existed: nothing half-logged.
    experiment = MlflowClient(uri).get_experiment_by_name("layerbench")
    assert experiment is None or not MlflowClient(uri).search_runs([experiment.experiment_id])


@pytest.mark.parametrize("runner", ["transformers", "accelerate"])
def test_peer_gives_transformers_greedy_tokens(runner: str, make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg(f"runner={runner}", "reference.enabled=true", "workload.max_new_tokens=6", "bench.repeats=2",
                   "workload.stop_at_eos=false", "tracking.enabled=true", f"tracking.uri={uri}")
    choices = {"model": "tiny", "runner": runner, **LAYERBENCH_DEFAULTS}
    resolved = {"runner": {"name": runner}, "cache": {"name": "ram", "pin_memory": True}, "workload": {"seed": 0}}
    report = run_job(cfg, resolved, choices=choices, overrides=[f"runner={runner}"], console=Console(quiet=True))
    assert report.agreement_vs_transformers == 1.0 and report.reference_tokens_match == 1.0
    assert report.new_tokens == 6 and report.tpot_s > 0 and report.load_s > 0 and report.peak_rss_bytes > 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("layerbench").experiment_id])
    params = run.data.params
    assert params["runner"] == runner and params["compression"] == "none" and params["kv_cache"] == "device"
    # Strategy options the peer does not use are none of its params: cache and prefetch for transformers.
    assert ("cache" in params) == ("prefetch" in params) == (runner == "accelerate")
    assert "cache.pin_memory" not in params and not any(key.startswith("prefetch.") for key in params)
    if runner == "accelerate":
        assert params["cache"] == "disk"  # its own way on a CPU: every decoder layer offloaded to disk
        assert params["prefetch"] == "off"  # its hooks load a layer as its forward starts
    artifact = client.download_artifacts(run.info.run_id, "generation.json", str(tmp_path))
    generated = json.loads(Path(artifact).read_text())
    assert len(generated["generated_ids"]) == 6 and "token_latency_s" in run.data.metrics
    # Both sides of tpot_ratio_vs_reference are means over bench.repeats, each with its spread.
    assert {"tpot_s_std", "reference_tpot_s_std", "reference_ttft_s_cv"} <= set(run.data.metrics)
    # ... and with the 95% interval of each and of their ratio, whose verdict is a tag; each generation's figure is
    # a step of its own history, the samples comparisons between runs resample.
    assert {"tpot_s_ci95_low", "tpot_s_ci95_high", "tpot_ratio_vs_reference_ci95_low"} <= set(run.data.metrics)
    assert run.data.tags["tpot_ratio_vs_reference.verdict"] in ("faster", "slower", "within_noise")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tpot_s_by_generation")] == [1, 2]


def test_accelerate_offloads_every_layer_on_a_cpu_and_fills_a_gpu_up_to_the_budget(outputs_dir: Path) -> None:
    from harness.config import ModelConfig

    ckpt = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny"), outputs_dir)
    config = LlamaConfig.from_pretrained(ckpt)
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]

    def request(device: str, cache: str, budget: int | None) -> LoadRequest:
        return LoadRequest(ckpt, torch.device(device), {"cache": CACHES[cache]}, budget, outputs_dir / "offload")

    cpu = offload_device_map(config, request("cpu", "disk", None))
    assert {cpu[name] for name in layers} == {"disk"} and cpu["model.embed_tokens"] == cpu["lm_head"] == "cpu"
    # The CUDA branch computes its map from the budget alone (accelerate's infer_auto_device_map): testable here.
    everything = 10 * checkpoint_bytes(ckpt)
    assert set(offload_device_map(config, request("cuda:0", "disk", everything)).values()) == {0}
    tight = offload_device_map(config, request("cuda:0", "ram", checkpoint_bytes(ckpt) // 2))
    placed = [tight.get(name, tight.get("model.layers")) for name in layers]
    assert 0 in tight.values() and "cpu" in placed and "disk" not in tight.values()
    with pytest.raises(VramCapExceeded, match="runner=accelerate"):
        offload_device_map(config, request("cuda:0", "disk", 1024))


def test_transformers_is_refused_before_loading_when_the_cap_cannot_hold_it(
    make_cfg: Callable[..., Config], outputs_dir: Path
) -> None:
    from harness.config import ModelConfig

    ckpt = ensure_checkpoint(ModelConfig(name="tiny", geometry="tiny"), outputs_dir)
    cpu = torch.device("cpu")
    small = LoadRequest(ckpt, cpu, {}, checkpoint_bytes(ckpt) - 1, outputs_dir / "x")
    runner = TransformersRunner(make_cfg("runner=transformers"), {}, cpu, outputs_dir)
    with pytest.raises(VramCapExceeded, match=r"runner=transformers holds the whole model.*runner=accelerate"):
        runner.load_model(small)


def test_peak_rss_is_the_jobs_own_after_a_reset() -> None:
    hungry = bytearray(256 << 20)
    hungry[:: 4096] = b"\1" * len(hungry[:: 4096])  # touch every page: resident
    before = peak_rss_bytes()
    del hungry
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert peak_rss_bytes() < before - (200 << 20)


@pytest.mark.extra(module="airllm", install="pip install -e '.[airllm]'")
def test_peers_preset_is_one_sweep_and_the_report_puts_each_runner_beside_layerbench(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "harness", "+experiment=peers", f"paths.outputs={tmp_path}",
           "workload.max_new_tokens=3", "bench.warmup=0", "probe.size_mib=16"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("peers").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    expected = {"layerbench", "transformers", "accelerate", "airllm"}
    assert {r.data.params["runner"] for r in children} == expected
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"tpot_s", "ttft_s", "peak_rss_bytes", "agreement_vs_transformers"} <= set(run.data.metrics)
        # Every runner's host load is measured alike: what its generation asked of the CPU beside its latency.
        assert run.data.metrics["process_cpu_share"] > 0 and "host_steal_share" in run.data.metrics
        assert run.data.metrics["host_loop_s"] > 0
        assert run.data.metrics["new_tokens"] == 3 and run.data.metrics["tpot_s"] > 0
        if run.data.params["runner"] != "airllm":
            assert run.data.metrics["agreement_vs_transformers"] == 1.0
        else:  # measured, not assumed: AirLLM was seen to diverge from the first token on a small Llama
            assert 0 <= run.data.metrics["agreement_vs_transformers"] <= 1
    out = subprocess.run(
        [sys.executable, "-m", "harness.report", "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment", "peers",
         "--last-sweep", "--peers", "--width", "250"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("runners side by side", 1)[1]
    lines = {line.split("│")[2].strip(): line for line in table.splitlines() if line.count("│") > 5}
    assert set(lines) == expected
    assert "1.00x" in lines["layerbench"] and lines["accelerate"].count("x") >= 3


def test_report_peers_needs_no_layerbench_run_to_print(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A listing without a layerbench run: the figures print, the ratios are absent, not invented.
    from harness.report.peers import peers_table
    from harness.report.rows import Row

    row = Row("a" * 32, "transformers", "FINISHED", 0, {"model": "tiny", "runner": "transformers"},
              {"tpot_s": 0.01, "ttft_s": 0.02, "peak_rss_bytes": 1e9, "agreement_vs_transformers": 1.0})
    Console(width=200).print(peers_table([row]))
    out = capsys.readouterr().out
    assert "0.0100 s" in out and "x layerbench" in out and "1.00x" not in out


def test_a_runner_target_that_is_no_runner_is_refused_by_name(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(TypeError, match=r"runner._target_='os.path.join' names no Runner class"):
        runner_class(make_cfg("runner._target_=os.path.join"))
    with pytest.raises(TypeError, match=r"runner._target_='harness.config.Config' is not a harness.runners"):
        runner_class(make_cfg("runner._target_=harness.config.Config"))
    assert runner_class(make_cfg("runner=accelerate")).__name__ == "AccelerateRunner"
