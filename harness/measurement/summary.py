"""The console summary printed at the end of a job."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def print_summary(console: Console, choices: Mapping[str, str], metrics: Mapping[str, float], text: str) -> None:
    table = Table(title="layerbench: " + " ".join(f"{k}={v}" for k, v in choices.items()))
    table.add_column("metric")
    table.add_column("value", justify="right")
    # (label, metric keys, format): a row shows when all its metrics exist, so absent stays absent.
    rows = [
        ("time to first token", ("ttft_s",), "{:.3f} s"),
        ("per-token latency (mean)", ("tpot_s",), "{:.3f} s"),
        ("per-token latency p50 / p90", ("token_latency_p50_s", "token_latency_p90_s"), "{:.3f} / {:.3f} s"),
        ("decode throughput", ("decode_tokens_per_s",), "{:.2f} tok/s"),
        ("new tokens", ("new_tokens",), "{:.0f}"),
        ("bytes read per pass", ("read_bytes_per_pass",), "{:,.0f}"),
        ("split", ("split_s",), "{:.2f} s"),
        ("peak host RSS", ("peak_rss_bytes",), "{:,.0f} B"),
        ("peak VRAM (allocated)", ("peak_vram_allocated_bytes",), "{:,.0f} B"),
        ("peak VRAM (NVML)", ("peak_vram_nvml_bytes",), "{:,.0f} B"),
        ("floor per token (slowest link)", ("floor_s",), "{:.4f} s"),
        ("per-token time / floor", ("floor_ratio",), "{:.1f}x"),
        ("transformers generate, per token", ("reference_tpot_s",), "{:.4f} s"),
        ("per-token time vs transformers", ("tpot_ratio_vs_reference",), "{:.1f}x"),
        ("top-1 agreement vs uncompressed", ("quality_top1_agreement",), "{:.3f}"),
        ("KL vs uncompressed (mean)", ("quality_kl_mean",), "{:.4f}"),
        ("perplexity / uncompressed", ("quality_ppl", "quality_ppl_reference"), "{:.2f} / {:.2f}"),
    ]
    for label, keys, fmt in rows:
        if all(key in metrics for key in keys):
            table.add_row(label, fmt.format(*(metrics[key] for key in keys)))
    console.print(table)
    console.print(f"[bold]generated:[/bold] {text!r}")
