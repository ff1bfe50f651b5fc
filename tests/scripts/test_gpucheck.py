"""The one-command GPU check (scripts/gpucheck.py): refuses without CUDA; its steps and table run on the CPU with the
tiny model; each of its runs is a preset that composes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from harness.compose import compose_config
from harness.config import Config
from harness.measurement.profile import OPS_FILE, TRACE_FILE
from harness.probe.gains import untried_gains

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpucheck  # noqa: E402  (a script, not a module of the package)
import gpulease_plan  # noqa: E402

PRESETS = ROOT / "conf" / "experiment" / gpucheck.PRESETS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_clearly_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpucheck.main([str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written before the refusal"


def test_a_run_asked_for_that_does_not_exist_is_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpucheck.main([str(tmp_path / "out"), "--only", "4bit, ram", "--only", "16bit"]) == 2
    assert "--only '16bit' picks no run (a word in a label, or =LABEL): the runs are bf16, ram, prefetch;" in (
        capsys.readouterr().err
    )
    assert gpucheck.main([str(tmp_path / "out"), "--only", "=4bit, ram, prefetch, depth"]) == 2  # not a whole label
    assert "--only '=4bit, ram, prefetch, depth' picks no run" in capsys.readouterr().err
    assert gpucheck.main([str(tmp_path / "out"), "--only", "4bit, ram", "--repeat", "0"]) == 2
    assert "--repeat 0: the rounds of the runs must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_exact_label_picks_that_run_alone_and_rounds_go_round_robin() -> None:
    runs = gpucheck.picked_runs(("=4bit, ram, prefetch", "cuda graph"), repeat=2)
    graph = "4bit, ram, prefetch, cuda graph"
    labels = ["4bit, ram, prefetch", graph, f"{graph}, blocking wait"]
    assert [label for label, _ in runs] == [*labels, *(f"{label} #2" for label in labels)]
    assert runs[0][1] == runs[3][1] == dict(gpucheck.ALL_RUNS)["4bit, ram, prefetch"] == "4bit_ram_prefetch"
    assert [label for label, _ in gpucheck.picked_runs(())] == [label for label, _ in gpucheck.RUNS]


def test_an_outdir_that_is_a_file_is_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").write_text("a file")
    assert gpucheck.main([str(tmp_path / "out")]) == 2
    assert "is a file: OUTDIR is the folder" in capsys.readouterr().err


def test_overrides_may_follow_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`OUT --skip-tests --only '4bit, ram' bench.profile=true`: an override after --only is no --only word."""
    seen: dict = {}

    def fake_check(outdir: Path, **kwargs) -> dict:
        seen.update(kwargs)
        outdir.mkdir(parents=True)
        (outdir / "gpucheck.md").write_text("table")
        return {"runs": {}}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpucheck, "install_missing", lambda wheels: [])
    monkeypatch.setattr(gpucheck, "run_check", fake_check)
    argv = [str(tmp_path / "out"), "workload.batch_size=2", "--skip-tests", "--only", "4bit, ram", "bench.profile=true"]
    assert gpucheck.main(argv) == 0
    assert seen["extra"] == ["workload.batch_size=2", "bench.profile=true"]
    assert seen["only"] == ("4bit, ram",) and seen["tests"] is False


@pytest.mark.parametrize(("extra", "new_tokens", "names"), [
    (["compression=3bit"], 2, "compression"),
    (["prefetch=on", "prefetch.depth=0"], 2, "prefetch.depth=0"),
    ([], 0, "max_new_tokens"),
], ids=["group option", "value", "new tokens"])
def test_a_bad_configuration_is_refused_before_any_step(
    tmp_path: Path, outputs_dir: Path, extra: list[str], new_tokens: int, names: str
) -> None:
    with pytest.raises(gpucheck.RefusedOverrides, match=names):
        gpucheck.run_check(
            tmp_path / "out", device="cpu", model="tiny", new_tokens=new_tokens, outputs=outputs_dir, tests=False,
            extra=extra, probe_mib=16,
        )
    assert not (tmp_path / "out").exists(), "refused before the tests, the probe and the first run"


def test_every_step_and_the_table_on_the_tiny_model(tmp_path: Path, outputs_dir: Path) -> None:
    out = tmp_path / "out"
    summary = gpucheck.run_check(
        out, device="cpu", model="tiny", new_tokens=2, outputs=outputs_dir, tests=False, extra=[], probe_mib=16
    )
    # The default runs, every one finished; the diagnostic A/Bs only when asked for (`--only`).
    assert {label: r["status"] for label, r in summary["runs"].items()} == dict.fromkeys(
        (label for label, _ in gpucheck.RUNS), "FINISHED"
    )
    assert summary["warm_up"] == "FINISHED"
    # The unbuilt parts' gains, measured first: O_DIRECT where the filesystem has it; out= decoding on CUDA only.
    untried = summary["untried"]
    direct = untried["cold_read_direct_bytes_per_s"]
    assert untried["cold_read_buffered_bytes_per_s"] > 0 and (direct is None or direct > 0)
    assert not any(key.startswith("dequant") for key in untried)
    # The decode's issue time with records read every call and kept (a copy in flight to wait for on CUDA only).
    waits = summary["decode_waits"]
    assert waits["decode_issue_record_per_call_s"] > 0 and waits["decode_issue_record_kept_s"] > 0
    saved = json.loads((out / "gpucheck.json").read_text())
    assert saved["runs"]["4bit, ram"]["metrics"]["tpot_s"] > 0
    table = (out / "gpucheck.md").read_text()
    assert table.count("| FINISHED |") == len(gpucheck.RUNS)
    assert "| 4bit, disk, cold |" in table and "floor ratio" in table
    assert "peak VRAM" in table and "–" in table, "no VRAM on the CPU: absent, not 0"
    # The host's load beside each run (the CPU share measured; throttling where the cgroup counts it), and its
    # cores and quota once.
    host_cell = table.splitlines()[4].split(" | ")[1 + [c for c, _ in gpucheck.COLUMNS].index(
        "host: CPU / steal / throttled")]
    assert host_cell.split(" / ")[0].endswith("%"), host_cell
    assert summary["host"]["cpus"] >= 1 and "cpu_quota_cores" in summary["host"]


def test_only_runs_in_the_order_asked_and_a_split_goes_once_no_later_run_reads_it(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    earlier = outputs / "splits" / "made-before" / "none"  # the check's to keep: it did not make it
    earlier.mkdir(parents=True)
    summary = gpucheck.run_check(
        tmp_path / "out", device="cpu", model="tiny", new_tokens=2, outputs=outputs, tests=False, extra=[],
        probe_mib=16, only=("4bit, ram", "8bit, ram"),
    )
    assert list(summary["runs"]) == [
        "4bit, ram", "4bit, ram, prefetch", "4bit, ram, prefetch, resident", "4bit, ram, prefetch, depth 2",
        "4bit, ram, prefetch, fixed segments", "4bit, ram, prefetch, NVML every 50 ms",
        "4bit, ram, prefetch, blocking wait", "4bit, ram, prefetch, cuda graph",
        "4bit, ram, prefetch, cuda graph, blocking wait", "8bit, ram, prefetch", "8bit, ram",
    ]
    for label in ("4bit, ram, prefetch, cuda graph", "4bit, ram, prefetch, cuda graph, blocking wait"):
        graph = summary["runs"].pop(label)  # CUDA graphs need CUDA: refused, and said why
        assert graph["status"] == "FAILED" and "runner.cuda_graph=true needs a CUDA device" in graph["reason"]
    assert all(r["status"] == "FINISHED" for r in summary["runs"].values())
    # Each split went after its last run; the one made before stays.
    assert {p.name for p in (outputs / "splits").glob("*/*")} == {"none"}
    # The prefetch runs' profiles went beside the table, each in a folder named for its run.
    assert {p.name for p in (tmp_path / "out" / "profiles").iterdir()} == {"8bit-ram-prefetch", "4bit-ram-prefetch"}
    for label in gpucheck.PROFILED:
        kept = tmp_path / "out" / "profiles" / gpucheck.slug(label)
        assert summary["runs"][label]["profile"] == str(kept)
        assert {p.name for p in kept.iterdir()} == {OPS_FILE, TRACE_FILE}
    assert not any((outputs / "profiles").iterdir())


def test_a_failing_untried_measurement_is_recorded_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.probe.links as links

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no scratch space")

    monkeypatch.setattr(links, "direct_read_rate", refuse)
    gains = untried_gains(torch.device("cpu"), tmp_path, 1 << 20, 1e9)
    assert gains == {"failed": "OSError: no scratch space"}


def test_hung_gpu_tests_are_reported_not_fatal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A test that hangs must not end the check before its runs: the lease's minutes are for the table."""
    import subprocess

    def hang(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"tests/test_graphs.py ..")

    monkeypatch.setattr(gpucheck.subprocess, "run", hang)
    assert gpucheck.run_gpu_tests(timeout_s=7) == "the gpu tests did not finish in 7 s (killed)"
    assert "tests/test_graphs.py .." in capsys.readouterr().out


def test_later_rounds_run_again_without_the_profiler(tmp_path: Path) -> None:
    summary = gpucheck.run_check(
        tmp_path / "out", device="cpu", model="tiny", new_tokens=2, outputs=tmp_path / "outputs", tests=False,
        extra=[], probe_mib=16, only=("=4bit, ram, prefetch",), repeat=2,
    )
    first, second = summary["runs"]["4bit, ram, prefetch"], summary["runs"]["4bit, ram, prefetch #2"]
    assert first["status"] == second["status"] == "FINISHED"
    assert "profile" in first and "profile" not in second  # the profiled generation costs lease time once
    assert "| 4bit, ram, prefetch #2 |" in (tmp_path / "out" / "gpucheck.md").read_text()


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_composes_and_validates(preset: str) -> None:
    cfg = OmegaConf.to_object(compose_config([gpucheck.preset(preset), "model=tiny"]))
    assert isinstance(cfg, Config)
    # What every run shares, from the sibling `common`.
    assert cfg.workload.prompt_tokens == 8 and not cfg.workload.stop_at_eos and not cfg.split.verify
    assert not (cfg.tracking.enabled or cfg.quality.enabled or cfg.reference.enabled)


def test_each_labelled_run_names_a_preset_of_its_own() -> None:
    labels, names = zip(*gpucheck.ALL_RUNS, strict=True)
    assert len(set(labels)) == len(labels) and len(set(names)) == len(names)
    # The lease's runs (scripts/gpulease.py) share the folder: every preset is some script's run.
    lease = {run.preset for run in gpulease_plan.ALL_RUNS}
    assert set(names) | lease == {p.stem for p in PRESETS.glob("*.yaml")} - {"common"}, "a run without a preset"
    assert set(gpucheck.PROFILED) <= set(labels)


def test_a_run_reads_its_choices_from_the_composed_config() -> None:
    """The presets choose the groups: the job's choices and the split to delete come from the config, not strings."""
    _, cfg = gpucheck.composed([gpucheck.preset("4bit_disk_cold_resident"), "model=tiny"])
    choices = gpucheck.choices(cfg)
    assert (choices["cache"], choices["compression"], choices["prefetch"], choices["residency"]) == (
        "disk", "4bit", "off", "auto")
    assert cfg.cache.page_cache == "cold" and choices["model"] == "tiny"
    # Overrides for every run come after the preset's and win.
    _, cfg = gpucheck.composed([gpucheck.preset("4bit_ram_prefetch"), "compression=8bit", "prefetch.depth=3"])
    assert (cfg.compression.name, cfg.prefetch.name, cfg.prefetch.depth) == ("8bit", "on", 3)


def test_the_gpu_tests_are_picked_by_marker_past_modules_that_cannot_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    seen: list[list[str]] = []

    def done(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="..\n2 passed, 40 deselected in 3.00s\n", stderr="")

    monkeypatch.setattr(gpucheck.subprocess, "run", done)
    assert gpucheck.run_gpu_tests() == "2 passed, 40 deselected in 3.00s"
    assert seen[0][seen[0].index("-m", 2) + 1] == "gpu" and "--continue-on-collection-errors" in seen[0]
    assert seen[0][-1] == "tests" and not any(a.endswith(".py") for a in seen[0][1:])
