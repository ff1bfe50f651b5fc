"""`python -m harness.report` over a small SQLite store written with RunTracker, as the harness writes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.measurement.units import ABSENT, format_metric, sig3
from harness.report.cli import main
from harness.report.rows import differing_params
from harness.report.table import percent_diff
from harness.tracking.client import ROLE_TAG, RunTracker, default_tracking_uri

WIDTH = "250"  # wide enough that rich neither wraps nor ellipsizes a cell


@dataclass
class Store:
    uri: str
    parent: str
    ram: str  # tiny ram none: the baseline in the tests
    disk: str  # tiny disk none
    disk_4bit: str  # tiny disk 4bit, max_new_tokens=8, no tpot_s
    failed: str
    standalone: str  # FINISHED, but not in the sweep


def _params(model: str, cache: str, compression: str, max_new_tokens: int = 20) -> dict[str, str]:
    # The flattened config as run_job logs it (group keys included), plus the choices.
    return {
        "model.name": model,
        "cache.name": cache,
        "compression.name": compression,
        "compression.blocksize": "64" if compression != "none" else "None",
        "workload.max_new_tokens": str(max_new_tokens),
        "workload.prompt": "The history of computing began with",
        "model": model,
        "cache": cache,
        "compression": compression,
        "prefetch": "off",
        "kv_cache": "device",
    }


def _run(
    uri: str,
    experiment: str,
    params: dict[str, str],
    metrics: dict[str, float],
    *,
    parent: str | None = None,
    status: str = "FINISHED",
    reason: str | None = None,
) -> str:
    tracker = RunTracker(uri, experiment)
    run_id = tracker.start(run_name=None, params=params, tags={}, parent_run_id=parent)
    tracker.log_metrics(metrics)
    tracker.end(status, reason=reason)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    # One store for the module: creating a SQLite store runs MLflow's migrations (~2 s).
    uri = default_tracking_uri(tmp_path_factory.mktemp("report_store"))
    sweep = RunTracker(uri, "layerbench")
    parent = sweep.start(run_name="sweep", params={}, tags={ROLE_TAG: "parent"})
    ram = _run(
        uri,
        "layerbench",
        _params("tiny", "ram", "none"),
        {"ttft_s": 1.5, "tpot_s": 0.2, "split_s": 0.05, "split_layer_file_bytes": 118e6, "decode_tokens_per_s": 5.0},
        parent=parent,
    )
    disk = _run(
        uri,
        "layerbench",
        _params("tiny", "disk", "none"),
        {"ttft_s": 2.0, "tpot_s": 0.25, "split_s": 0.05, "split_layer_file_bytes": 118e6, "decode_tokens_per_s": 4.0},
        parent=parent,
    )
    disk_4bit = _run(
        uri,
        "layerbench",
        _params("tiny", "disk", "4bit", max_new_tokens=8),
        {"ttft_s": 3.0, "split_s": 0.5, "split_layer_file_bytes": 33.3e6},
        parent=parent,
    )
    sweep.end("FINISHED")
    failed = _run(
        uri,
        "layerbench",
        _params("tiny", "ram", "8bit"),
        {},
        status="FAILED",
        reason="RuntimeError: out of memory",
    )
    standalone = _run(uri, "layerbench", _params("llama3.2-1b-synthetic", "ram", "none"), {"ttft_s": 9.0})

    # The write-up experiment: one run per row of the write-up.
    for cache, compression, metrics in (
        ("disk", "none", {"split_s": 3.0, "tpot_s": 0.5, "ttft_s": 4.0, "split_layer_file_bytes": 236e6,
                          "split_files_written": 7}),
        ("disk", "4bit", {"split_s": 2.0, "split_layer_file_bytes": 59e6, "ttft_s": 2.0, "tpot_s": 0.2}),
        # Reused the 4-bit split: its split_s timed a checksum pass, which is no split time.
        ("ram", "4bit", {"ttft_s": 1.19, "tpot_s": 0.07, "split_s": 0.01, "split_layer_file_bytes": 59e6,
                         "split_files_written": 0}),
    ):
        _run(uri, "airllm_writeup", _params("llama3-8b-synthetic", cache, compression), metrics)
    return Store(uri, parent, ram, disk, disk_4bit, failed, standalone)


def _report(capsys: pytest.CaptureFixture[str], store: Store, *args: str) -> tuple[int, str, str]:
    code = main(["--uri", store.uri, "--width", WIDTH, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _line(out: str, run_id: str) -> str:
    lines = [line for line in out.splitlines() if run_id[:8] in line]
    assert len(lines) == 1, f"expected one row for {run_id[:8]} in:\n{out}"
    return lines[0]


def test_table_lists_finished_runs_with_units(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store)
    assert code == 0
    ram = _line(out, store.ram)
    # Choices, plus the one param that differs beyond them; group keys (compression.blocksize) stay out.
    assert "tiny ram none off device workload.max_new_tokens=20" in ram
    assert "blocksize" not in out
    assert "1.50 s" in ram and "0.200 s" in ram and "118 MB" in ram and "5.00 tok/s" in ram
    assert "workload.max_new_tokens=8" in _line(out, store.disk_4bit)
    assert "33.3 MB" in _line(out, store.disk_4bit)
    assert "9.00 s" in _line(out, store.standalone)
    # FINISHED only by default, and the sweep's parent run is never a row.
    assert store.failed[:8] not in out
    assert store.parent[:8] not in out


def test_absent_metric_is_a_dash_not_zero(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store, "--metrics", "ttft_s,tpot_s")
    assert code == 0
    row = _line(out, store.disk_4bit)
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    assert cells[-2:] == ["3.00 s", ABSENT]
    # A metric nobody logged (floor_ratio, in the defaults) is a column of dashes.
    code, out, _ = _report(capsys, store, "--metrics", "floor_ratio")
    assert [cell.strip() for cell in _line(out, store.ram).split("│") if cell.strip()][-1] == ABSENT


def test_baseline_percentages(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store, "--last-sweep", "--metrics", "ttft_s,tpot_s", "--baseline", store.ram[:6])
    assert code == 0
    assert "(baseline)" in _line(out, store.ram)
    assert "%" not in _line(out, store.ram)
    disk = _line(out, store.disk)
    assert f"({(2.0 - 1.5) / 1.5 * 100:+.1f}%)" in disk  # (+33.3%)
    assert f"({(0.25 - 0.2) / 0.2 * 100:+.1f}%)" in disk  # (+25.0%)
    # No percentage where the row lacks the metric.
    assert _line(out, store.disk_4bit).rstrip("│ ").endswith(ABSENT)


def test_sweep_selection(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    for args in (["--last-sweep"], ["--parent", store.parent[:10]]):
        code, out, _ = _report(capsys, store, *args)
        assert code == 0
        assert store.standalone[:8] not in out
        assert all(run[:8] in out for run in (store.ram, store.disk, store.disk_4bit))
        assert store.parent in out  # named in the title


def test_filter(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store, "--filter", "params.compression = '4bit'")
    assert code == 0
    assert store.disk_4bit[:8] in out and store.ram[:8] not in out
    code, _, err = _report(capsys, store, "--filter", "params.model = 'nope'")
    assert code == 1 and "no FINISHED runs matching" in err


def test_plot_writes_png(capsys: pytest.CaptureFixture[str], store: Store, tmp_path: Path) -> None:
    path = tmp_path / "plots" / "sweep.png"
    code, out, _ = _report(capsys, store, "--plot", str(path), "--baseline", store.ram)
    assert code == 0
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert "plot:" in out


def test_status_all_shows_failed_runs(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store, "--status", "all")
    assert code == 0
    failed = _line(out, store.failed)
    assert "FAILED: RuntimeError: out of memory" in failed
    assert "FINISHED" in _line(out, store.ram)
    code, out, _ = _report(capsys, store, "--status", "failed")
    assert code == 0 and store.failed[:8] in out and store.ram[:8] not in out


def test_writeup_compares_with_seed_figures(capsys: pytest.CaptureFixture[str], store: Store) -> None:
    code, out, _ = _report(capsys, store, "--writeup")
    assert code == 0
    assert "Meta-Llama-3-8B-Instruct" in out and "llama3-8b-synthetic" in out
    for seed in ("> 2 h", "> 2 min", "~10 min", "118 MB per layer", "1 min 59 s", "~7 s per token"):
        assert seed in out
    lines = out.splitlines()

    def ratio(seed_row: str, metric: str) -> str:
        (line,) = [ln for ln in lines if seed_row in ln and f" {metric} " in ln]
        return [cell.strip() for cell in line.split("│") if cell.strip()][-1]

    assert ratio("bf16, layers read from disk", "split_s") == f"> {7200 / 3.0:,.0f}x"  # > 2,400x
    assert ratio("bf16, layers read from disk", "tpot_s") == f"> {120 / 0.5:.0f}x"  # > 240x
    assert ratio("bf16, layers read from disk", "ttft_s") == ABSENT  # the write-up gave no figure
    assert ratio("4-bit, layers read from disk", "split_s") == f"~{600 / 2.0:.0f}x"  # ~300x
    assert ratio("4-bit, layers read from disk", "split_layer_file_bytes") == f"{118e6 / 59e6:.2f}x"  # 2.00x
    assert ratio("4-bit, layers kept in RAM", "ttft_s") == f"{119 / 1.19:.0f}x"  # 100x
    assert ratio("4-bit, layers kept in RAM", "tpot_s") == f"~{7 / 0.07:.0f}x"  # ~100x
    (reused,) = [ln for ln in lines if "4-bit, layers kept in RAM" in ln and " split_s " in ln]
    assert [cell.strip() for cell in reused.split("│") if cell.strip()][-2] == ABSENT, "a reused split has no time"


def test_missing_experiment_store_or_baseline(capsys: pytest.CaptureFixture[str], store: Store, tmp_path: Path) -> None:
    code, out, err = _report(capsys, store, "--experiment", "no-such-experiment")
    assert code == 1
    assert "'no-such-experiment' not found" in err and "'layerbench'" in err
    code, _, err = _report(capsys, store, "--baseline", "ffffffff")
    assert code == 1 and "--baseline 'ffffffff'" in err
    missing = default_tracking_uri(tmp_path / "nowhere")
    assert main(["--uri", missing]) == 1
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "nowhere" / "mlflow.db").exists()  # the report never creates a store


def test_formatting_helpers() -> None:
    values = (7200, 1234.5, 0.012345, 9.996, 1.5, 0)
    assert [sig3(v) for v in values] == ["7,200", "1,230", "0.0123", "10.0", "1.50", "0"]
    assert format_metric("tpot_s", 0.1234) == "0.123 s"
    assert format_metric("peak_vram_nvml_bytes", 3.9e9) == "3.90 GB"
    assert format_metric("split_layer_file_bytes", 999_800) == "1.00 MB"
    assert format_metric("floor_ratio", 1.25) == "1.25x"
    assert format_metric("ttft_s", None) == ABSENT
    assert format_metric("new_tokens", 20.0) == "20"
    assert percent_diff(1.1, 1.0) == pytest.approx(10.0)
    assert percent_diff(None, 1.0) is None and percent_diff(1.0, None) is None and percent_diff(1.0, 0.0) is None


def test_differing_params_ignores_what_the_choices_explain() -> None:
    a = {"model": "local", "model.path": "/a", "compression": "none", "compression.blocksize": "None", "seed": "0"}
    b = {"model": "local", "model.path": "/b", "compression": "4bit", "compression.blocksize": "64", "seed": "0"}
    c = {**b, "seed": "1", "new_key": "x"}
    assert differing_params([a, b, c]) == ["model.path", "new_key", "seed"]


def test_sweep_comparison_is_fastest_first_with_intervals_and_verdicts() -> None:
    from harness.report.compare import Samples
    from harness.report.rows import Row
    from harness.report.sweep_summary import comparison_csv, comparison_markdown, describe, ranked, vs_fastest

    def row(name: str, **metrics: float) -> Row:
        return Row(run_id=name * 8, run_name=name, status="FINISHED", start_time=0, params={}, metrics=metrics)

    fast, tied, slow = row("fast", tpot_s=0.1), row("tied", tpot_s=0.101), row("slow", tpot_s=0.3, ttft_s=1.0)
    rows = ranked([slow, row("one-token", ttft_s=0.5), fast, tied])
    assert [r.run_name for r in rows] == ["fast", "tied", "slow", "one-token"]
    samples = {  # three generations each: the per-generation values a job logs
        fast.run_id: Samples({"tpot_s": [0.100, 0.098, 0.102]}),
        tied.run_id: Samples({"tpot_s": [0.099, 0.104, 0.100]}),
        slow.run_id: Samples({"tpot_s": [0.30, 0.29, 0.31]}),
        "one-token" * 8: Samples({"ttft_s": [0.5]}),
    }
    ratios = vs_fastest(rows, samples)
    assert ratios[slow.run_id].verdict == "slower" and ratios[slow.run_id].interval.low > 1
    assert ratios[tied.run_id].verdict == "within_noise" and ratios["one-token" * 8] is None
    table = comparison_markdown(rows, ["tpot_s", "ttft_s"], ratios)
    assert table.splitlines()[2] == "| fast | 0.100 s | – | fastest |"
    assert "| slow | 0.300 s | 1.00 s | 3.00x [" in table and "x] slower |" in table
    assert "| one-token | – | 0.500 s | – |" in table
    header, fastest, _, slow_line, _ = comparison_csv(rows, ["tpot_s"], ratios).splitlines()
    assert header == ("run,run_id,tpot_s,tpot_s_vs_fastest,tpot_s_vs_fastest_ci95_low,tpot_s_vs_fastest_ci95_high,"
                      "tpot_s_vs_fastest_verdict")
    assert fastest.endswith(",1.0,,,fastest")
    ratio, low, high, verdict = slow_line.split(",")[-4:]
    assert float(ratio) == pytest.approx(3.0, rel=0.01) and 1 < float(low) < float(ratio) < float(high)
    assert verdict == "slower"
    # The tie is said, not hidden behind a "fastest".
    assert describe(rows, ratios).startswith(
        "**No single fastest**: fast (0.100 s per token) and tied are within the noise of each other")
    assert "slowest: slow, 3.00x [" in describe(rows, ratios)
    apart = [fast, slow]
    assert describe(apart, vs_fastest(apart, samples)).startswith("**Fastest: fast**, 0.100 s per token; slowest")
