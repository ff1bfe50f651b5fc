"""The one-lease GPU script (scripts/gpulease.py) run whole on the CPU with the tiny model (--smoke): layerbench and
accelerate rows with their figures, AirLLM skipped with the reason, the 70B runs generated straight into their
splits; the CSV and the table written as it goes. With a stand-in worker and clock: runs that do not fit the time
skip with the reason and AirLLM's 8B run gives way to the 1B pair; a run past its timeout is killed and the next one
gets a fresh worker; refusals come before any step."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpucheck_jobs  # noqa: E402  (scripts, not modules of the package)
import gpulease  # noqa: E402
import gpulease_plan  # noqa: E402
import gpulease_results  # noqa: E402

SMOKE = dict.fromkeys(gpulease_plan.MODELS, gpulease_plan.SMOKE_MODEL)
LB_4BIT = "8B, layerbench, 4bit, ram, prefetch"
AIRLLM = "8B, airllm, 4bit"
RAM_70B = "70B, layerbench, 4bit, ram, resident"


def read_csv(out: Path) -> list[dict[str, str]]:
    (path,) = out.glob("*-gpulease.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == gpulease_results.CSV_COLUMNS
        return list(reader)


def test_the_whole_lease_runs_on_the_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    out, outputs = tmp_path / "out", tmp_path / "outputs"
    gpulease.run_lease(
        out, smoke=True, models=SMOKE, new_tokens=4, budget_s=900, outputs=outputs, probe_mib=16,
        only=(f"={LB_4BIT}", "8B, accelerate", "8B, airllm", f"={RAM_70B}"),
    )
    rows = {row["run"]: row for row in read_csv(out)}
    assert list(rows) == [LB_4BIT, "8B, accelerate, ram", "8B, accelerate, disk", AIRLLM, RAM_70B]
    finished = [rows[label] for label in rows if label != AIRLLM]
    for row in finished:
        assert row["status"] == "FINISHED", row
        assert (row["device"], row["model"], row["torch"]) == ("cpu", "tiny", torch.__version__)
        assert float(row["tpot_s"]) > 0 and float(row["ttft_s"]) > 0 and row["new_tokens"] == "4"
        assert row["prompt_tokens"] == "8" and row["vram_cap_gib"] == "4.0"
        assert row["peak_vram_nvml_bytes"] == "", "no NVML on a CPU: blank, not 0"
    # Each runner's own options, the presets' choices honoured by the peer (accelerate defaults to disk).
    assert [rows[k]["cache"] for k in ("8B, accelerate, ram", "8B, accelerate, disk")] == ["ram", "disk"]
    assert (rows[LB_4BIT]["runner"], rows[LB_4BIT]["compression"], rows[LB_4BIT]["prefetch"]) == (
        "layerbench", "4bit", "on")
    assert rows["8B, accelerate, ram"]["residency"] == "" and rows[RAM_70B]["residency"] == "auto"
    assert float(rows[LB_4BIT]["floor_s"]) > 0 and float(rows[LB_4BIT]["floor_ratio"]) > 0
    # transformers' greedy tokens: the uncompressed peer gives them all; the 70B has no weights to compare with.
    assert float(rows["8B, accelerate, ram"]["agreement_vs_transformers"]) == 1.0
    assert 0 <= float(rows[LB_4BIT]["agreement_vs_transformers"]) <= 1
    assert rows[RAM_70B]["agreement_vs_transformers"] == "" and "n/a" in rows[RAM_70B]["note"]
    # AirLLM, installed or not, cannot run here: skipped with the reason (the extra, or its CUDA-only compression).
    air = rows[AIRLLM]
    assert air["status"] == "SKIPPED" and "runner=airllm" in air["reason"] and air["tpot_s"] == ""
    table = next(out.glob("*-gpulease.md")).read_text()
    assert "| run | device | model | runner | cache |" in table and "| agreement with transformers |" in table
    for label in rows:
        assert f"| {label} | cpu | tiny |" in table
    assert "skipped: runner=airllm" in table and "| 100% |" in table
    saved = json.loads(next(out.glob("*-gpulease.json")).read_text())
    assert saved["facts"]["device"] == "cpu" and saved["facts"]["warm_up"] == "FINISHED"
    assert saved["reports"][LB_4BIT]["metrics"]["tpot_s"] > 0
    # The 70B runs' model was generated straight into its split: a weightless checkpoint, deleted with its split
    # once no later run read them, as was accelerate's offload folder.
    assert not list((outputs / "peers").rglob("tiny-*"))
    kept = list((outputs / "models").iterdir())
    assert len(kept) == 2 and {p.name.endswith(".lock") for p in kept} == {True, False}, (
        "the warm-up's checkpoint (made before the runs) and its lock stay")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeWorker:
    """Answers as the worker would, instantly, moving the clock on by each run's scripted seconds; None is a run
    that outlived its timeout."""

    def __init__(self, clock: Clock, runs: dict[tuple[str, str], tuple[float, dict[str, Any] | None]],
                 out: Path) -> None:
        self.clock, self.runs, self.out = clock, runs, out
        self.started, self.alive, self.setups, self.asked = 0, False, [], []
        self.seen_on_disk: list[dict[str, str]] = []

    def ask(self, op: str, timeout_s: float, **kwargs: Any) -> dict[str, Any] | None:
        if not self.alive:
            self.started += 1
            self.alive = True
        if op == "setup":
            self.setups.append(kwargs["refresh"])
            self.clock.t += 40
            return {"device": kwargs["device"], "gpu": "Fake GPU 80GB", "torch": "9.9", "h2d_pinned_bytes_per_s": 5e10}
        overrides = kwargs["overrides"]
        key = (next(o.rsplit("/", 1)[1] for o in overrides if o.startswith("+experiment=")),
               next(o.split("=", 1)[1] for o in overrides if o.startswith("model=")))
        self.asked.append((key, timeout_s, kwargs["reference"]))
        self.seen_on_disk = read_csv(self.out)  # what a lease that ended now would keep
        seconds, reply = self.runs[key]
        self.clock.t += seconds
        if reply is None:
            self.alive = False
        return reply

    def close(self) -> None:
        self.alive = False


def finished(tpot_s: float, ids: list[int], reference: list[int] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"status": "FINISHED", "metrics": {"tpot_s": tpot_s, "ttft_s": 2 * tpot_s},
                             "generated_ids": ids}
    if reference is not None:
        reply["reference_ids"] = reference
    return reply


@pytest.fixture()
def anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run can run on this machine (the stand-in worker is the GPU), and the disk is large."""
    monkeypatch.setattr(gpulease, "cannot_run_here", lambda planned: None)
    monkeypatch.setattr(gpulease, "free_bytes", lambda path: 1 << 50)


def test_runs_past_the_budget_skip_and_airllm_gives_way_to_the_1b_pair(tmp_path: Path, anywhere: None) -> None:
    clock, out = Clock(), tmp_path / "out"
    worker = FakeWorker(clock, {
        ("4bit_ram_prefetch", "llama3-8b-synthetic"): (100, finished(0.1, [1, 2, 3, 4], reference=[1, 2, 3, 5])),
        ("4bit_ram_prefetch", "llama3.2-1b-synthetic"): (10, finished(0.02, [7, 7, 7, 7], reference=[7, 7, 7, 7])),
        ("airllm_4bit", "llama3.2-1b-synthetic"): (10, finished(0.5, [7, 8, 8, 8])),
    }, out)
    gpulease.run_lease(
        out, smoke=False, models=gpulease_plan.MODELS, new_tokens=4, budget_s=250, outputs=tmp_path / "outputs",
        only=(f"={LB_4BIT}", f"={AIRLLM}", f"={RAM_70B}"), clock=clock, worker=worker,  # type: ignore[arg-type]
    )
    rows = read_csv(out)
    by_label = {row["run"]: row for row in rows}
    assert [row["run"] for row in rows] == [LB_4BIT, AIRLLM, "1B, layerbench, 4bit, ram, prefetch",
                                            "1B, airllm, 4bit", RAM_70B]
    assert by_label[AIRLLM]["status"] == "SKIPPED" and by_label[AIRLLM]["reason"].startswith("time (needs ~")
    for label in ("1B, layerbench, 4bit, ram, prefetch", "1B, airllm, 4bit"):
        assert by_label[label]["status"] == "FINISHED" and by_label[label]["model"] == "llama3.2-1b-synthetic"
        assert f"in place of '{AIRLLM}', which was skipped: time" in by_label[label]["note"]
    assert by_label[RAM_70B]["status"] == "SKIPPED" and "s left)" in by_label[RAM_70B]["reason"]
    # Agreement with each checkpoint's own reference, asked for on its first run only.
    assert float(by_label[LB_4BIT]["agreement_vs_transformers"]) == 0.75
    assert float(by_label["1B, airllm, 4bit"]["agreement_vs_transformers"]) == 0.25
    assert [reference for _, _, reference in worker.asked] == [True, True, False]
    # Each timeout within the budget left; the machine's facts on every row, the GPU in the file name.
    assert all(timeout <= 250 for _, timeout, _ in worker.asked)
    assert {row["gpu"] for row in rows} == {"Fake GPU 80GB"} and {row["torch"] for row in rows} == {"9.9"}
    assert next(out.glob("*-gpulease.csv")).name.endswith("-fake-gpu-80gb-gpulease.csv")
    # Written as it went: when the second run started, the first was on disk, finished, and the second running.
    seen = {row["run"]: row["status"] for row in worker.seen_on_disk}
    assert seen[LB_4BIT] == "FINISHED" and seen["1B, airllm, 4bit"] == "running"
    assert seen[RAM_70B] == "pending"


def test_a_run_past_its_timeout_is_killed_and_the_next_gets_a_fresh_worker(tmp_path: Path, anywhere: None) -> None:
    clock, out = Clock(), tmp_path / "out"
    worker = FakeWorker(clock, {
        ("accelerate_ram", "llama3-8b-synthetic"): (200, None),
        ("accelerate_disk", "llama3-8b-synthetic"): (60, finished(1.5, [1, 2], reference=[1, 2])),
    }, out)
    gpulease.run_lease(
        out, smoke=False, models=gpulease_plan.MODELS, new_tokens=2, budget_s=480, outputs=tmp_path / "outputs",
        only=("8B, accelerate",), run_timeout_cap_s=200, clock=clock, worker=worker,  # type: ignore[arg-type]
    )
    rows = {row["run"]: row for row in read_csv(out)}
    assert rows["8B, accelerate, ram"]["status"] == "TIMEOUT"
    assert rows["8B, accelerate, ram"]["reason"] == "timed out: killed after 200 s"
    assert rows["8B, accelerate, disk"]["status"] == "FINISHED"
    # The fresh worker is set up again, the probe read from its cache; the reference still asked for.
    assert worker.setups == [True, False] and worker.started == 2
    assert [reference for _, _, reference in worker.asked] == [True, True]


def test_a_run_the_disk_cannot_hold_is_skipped_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anywhere: None
) -> None:
    monkeypatch.setattr(gpulease, "free_bytes", lambda path: 10 * 10**9)
    clock, out = Clock(), tmp_path / "out"
    worker = FakeWorker(clock, {}, out)
    gpulease.run_lease(out, smoke=False, models=gpulease_plan.MODELS, new_tokens=8, budget_s=480,
                       outputs=tmp_path / "outputs", only=(f"={LB_4BIT}",), clock=clock, worker=worker)  # type: ignore[arg-type]
    (row,) = read_csv(out)
    assert row["status"] == "SKIPPED" and row["reason"].startswith("disk (needs 22.1 GB + 2.1 GB spare, 10.0 GB free")
    assert worker.asked == []


def test_room_is_made_from_what_is_read_latest_and_only_where_it_is_enough(tmp_path: Path) -> None:
    def resource(name: str, gb: float) -> gpulease_plan.Resource:
        return gpulease_plan.Resource(name, str(tmp_path / name), int(gb * 10**9), 0.0)

    ckpt, split, other = resource("ckpt", 16), resource("split", 6), resource("other", 3)

    class Later:
        def __init__(self, *resources: gpulease_plan.Resource) -> None:
            self.resources = list(resources)

    later = [Later(other), Later(ckpt)]  # `other` read next, `ckpt` after it, `split` never again
    margin = gpulease_plan.DISK_MARGIN_BYTES
    free = 30 * 10**9
    assert gpulease_plan.make_room(20 * 10**9, free, [ckpt, split, other], later) == []  # fits already
    need = free - margin + 5 * 10**9
    assert gpulease_plan.make_room(need, free, [ckpt, split, other], later) == [split]
    need = free - margin + 20 * 10**9
    assert gpulease_plan.make_room(need, free, [ckpt, split, other], later) == [split, ckpt]
    assert gpulease_plan.make_room(free + 10**12, free, [ckpt, split, other], later) == [], "not enough: keep all"


def test_an_airllm_run_without_the_extra_is_skipped_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airllm" else real_find_spec(
        name, *a))
    (planned,) = gpulease_plan.plan_runs([gpulease_plan.FALLBACK_RUNS[1]], device="cpu", models=SMOKE, new_tokens=8,
                                         outputs=tmp_path, extra=[], smoke=True)
    reason = gpulease_plan.cannot_run_here(planned)
    assert reason is not None and "pip install 'layerbench[airllm]'" in reason


def test_the_command_line_maps_smoke_to_the_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_lease(outdir: Path, **kwargs: Any) -> gpulease_results.Results:
        seen.update(kwargs)
        return gpulease_results.Results(outdir, {"device": "cpu", "vram_cap_gib": 4, "prompt_tokens": 8,
                                                 "new_tokens": 8, "budget_s": 480})

    monkeypatch.setattr(gpulease, "install_missing", lambda wheels, optional=(): [])
    monkeypatch.setattr(gpulease, "run_lease", fake_lease)
    assert gpulease.main([str(tmp_path / "out"), "--smoke", "--only", "8B", "bench.repeats=2"]) == 0
    assert seen["models"] == SMOKE and seen["smoke"] is True and seen["probe_mib"] == 16
    assert seen["only"] == ("8B",) and seen["extra"] == ["bench.repeats=2"] and seen["new_tokens"] == 8


@pytest.mark.parametrize(("argv", "says"), [
    (["--smoke", "--only", "16B"], "--only '16B' picks no run (a word in a label, or =LABEL): the runs are 8B,"),
    (["--smoke", "--budget-s", "30"], "--budget-s 30: the setup alone takes about 45 s"),
    (["--smoke", "--new-tokens", "0"], "--new-tokens 0: each run generates 1 new token or more"),
    (["--smoke", "--run-timeout-s", "0"], "--run-timeout-s 0: a run's timeout must be positive"),
], ids=["unknown run", "budget", "new tokens", "timeout"])
def test_bad_input_is_refused_before_any_step(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], says: str
) -> None:
    assert gpulease.main([str(tmp_path / "out"), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_override_is_refused_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpulease.main([str(tmp_path / "out"), "--smoke", "--only", "8B", "workload.batch_size=0"]) == 2
    assert "a run's configuration is refused, before any step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_only_the_smoke_run_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("a file")
    assert gpulease.main([str(tmp_path / "file"), "--smoke"]) == 2
    assert "is a file: OUTDIR is the folder the results go to" in capsys.readouterr().err
    assert gpulease.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--smoke runs it on the CPU" in err


# A CUDA context's device memory, in GiB: a GPU has that much less of the cap than a plan on a CPU.
CUDA_CONTEXT_GIB = 0.8


@pytest.mark.parametrize("run", [r for r in gpulease_plan.ALL_RUNS if "layerbench" in r.label], ids=lambda r: r.label)
def test_every_streamed_lease_run_fits_the_cap_at_its_real_geometry(tmp_path: Path, run: Any) -> None:
    """Planned on this CPU, with the CUDA context taken off the cap: a run the cap would refuse on the GPU is found
    here, not in the lease."""
    from harness.runners.layerbench.plan_only import predict

    overrides = [
        gpucheck_jobs.preset(run.preset), f"model={gpulease_plan.MODELS[run.size]}", f"paths.outputs={tmp_path}",
        "probe.enabled=false", "runner.cuda_graph=false",
    ]
    _, cfg = gpucheck_jobs.composed(overrides)
    cfg.vram.cap_gib -= CUDA_CONTEXT_GIB
    predict(cfg, tmp_path)  # raises PlanRefused, with the numbers, when it does not fit
