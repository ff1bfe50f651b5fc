"""The run report: one typed object from the job to the console, MLflow and back; units formatted one way."""

from __future__ import annotations

import pytest
from rich.console import Console

from harness.measurement.metrics import aggregate
from harness.measurement.run_report import RunReport
from harness.measurement.summary import print_summary
from harness.measurement.units import format_metric, metric_kind


def test_unknown_names_are_refused_not_logged() -> None:
    with pytest.raises(KeyError, match="ttft_seconds"):
        RunReport().add({"ttft_seconds": 1.0})


def test_absent_figures_stay_absent_and_spread_travels_with_its_figure() -> None:
    report = RunReport().add(aggregate([{"ttft_s": 1.0, "tpot_s": 0.5}, {"ttft_s": 3.0, "tpot_s": 0.5}]))
    assert report.ttft_s == 2.0 and report.peak_vram_nvml_bytes is None
    metrics = report.metrics()
    assert "peak_vram_nvml_bytes" not in metrics, "absent, never 0"
    assert metrics["ttft_s_std"] == pytest.approx(2**0.5) and metrics["ttft_s_cv"] == pytest.approx(2**0.5 / 2)
    assert "tpot_s_cv" in metrics and metrics["tpot_s_std"] == 0.0


def test_mlflow_round_trip_keeps_known_figures_and_drops_others() -> None:
    report = RunReport(ttft_s=0.1, read_bytes_per_pass=3.0e9, floor_ratio=4.2)
    back = RunReport.from_metrics({**report.metrics(), "a_metric_of_a_newer_version": 1.0})
    assert back == report


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("ttft_s", 0.058, "0.0580 s"),
        ("peak_rss_bytes", 3_387_060_224, "3.39 GB"),
        ("read_bytes_per_pass", 100_244, "100 kB"),
        ("kv_bytes_per_token", 512, "512 B"),
        ("read_bandwidth_bytes_per_s", 7.7e9, "7.70 GB/s"),
        ("decode_tokens_per_s", 168.25, "168 tok/s"),
        ("floor_ratio", 3.1, "3.10x"),
        ("new_tokens", 20.0, "20"),
        ("quality_kl_mean", 0.00283, "0.00283"),
        ("energy_per_token_j", 0.5, "0.500 J"),
        ("power_mean_w", 312.0, "312 W"),
        ("warmup_generations", 3.0, "3"),
    ],
)
def test_a_value_is_shown_with_the_unit_its_name_carries(name: str, value: float, shown: str) -> None:
    assert format_metric(name, value) == shown


def test_every_figure_name_says_how_to_read_it() -> None:
    # Counts, fractions and flags are plain numbers; everything else carries a unit in its name.
    unitless = ("_share", "_tokens", "_written", "passes", "_layers", "_residual", "_efficiency", "_agreement",
                "_mean", "_match", "_vs_transformers", "_positions", "_per_pass", "_per_token", "_generations")
    plain = {n for n in RunReport.figure_names() if metric_kind(n) == "number"}
    assert all(n.endswith(unitless) or n.startswith("quality_ppl") for n in plain), sorted(plain)


def test_summary_shows_measured_labelled_figures_only() -> None:
    console = Console(record=True, width=100)
    print_summary(console, {"cache": "ram"}, RunReport(ttft_s=0.25, peak_rss_bytes=2e9), "hello")
    out = console.export_text()
    assert "time to first token" in out and "0.250 s" in out and "2.00 GB" in out
    assert "floor" not in out, "a figure that was not measured has no row"
    assert "generated: 'hello'" in out


def test_the_report_cli_names_only_figures_the_job_produces() -> None:
    from harness.report.cli import DEFAULT_METRICS
    from harness.report.writeup import WRITEUP_METRICS

    assert set(DEFAULT_METRICS) | set(WRITEUP_METRICS) <= set(RunReport.figure_names())


def test_plot_axes_use_the_units_the_tables_use() -> None:
    from harness.measurement.units import axis_scale

    assert axis_scale("read_bandwidth_bytes_per_s", [2e9, 7.7e9]) == ("GB/s", 1e9)
    assert axis_scale("peak_rss_bytes", [5e8, None]) == ("MB", 1e6)
    assert axis_scale("decode_tokens_per_s", [3.0]) == ("tok/s", 1.0)
    assert axis_scale("tpot_s", [0.1]) == ("s", 1.0)


def test_agreement_counts_positions_and_missing_tokens() -> None:
    from harness.job.reference import agreement

    assert agreement([[1, 2, 3]], [[1, 2, 4]]) == pytest.approx(2 / 3)
    assert agreement([[1, 2]], [[1, 2, 3]]) == pytest.approx(2 / 3), "stopping early is a disagreement"
    assert agreement([[5, 2, 3]], [[1, 2, 3]]) == pytest.approx(2 / 3) and agreement([[]], [[]]) == 1.0
    # A batch: positions over every sequence (3 of 5 agree), not a mean of per-sequence fractions.
    assert agreement([[1, 2, 3], [7, 8]], [[1, 2, 3], [9, 9]]) == pytest.approx(3 / 5)
