"""The console summary printed at the end of a job."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def print_summary(console: Console, choices: Mapping[str, str], metrics: Mapping[str, float], text: str) -> None:
    table = Table(title="layerbench: " + " ".join(f"{k}={v}" for k, v in choices.items()))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("time to first token", "ttft_s", "{:.3f} s"),
        ("per-token latency (mean)", "tpot_s", "{:.3f} s"),
        ("per-token latency p50 / p90", None, None),
        ("decode throughput", "decode_tokens_per_s", "{:.2f} tok/s"),
        ("new tokens", "new_tokens", "{:.0f}"),
        ("bytes read per pass", "read_bytes_per_pass", "{:,.0f}"),
        ("split", "split_s", "{:.2f} s"),
        ("peak host RSS", "peak_rss_bytes", "{:,.0f} B"),
        ("peak VRAM (allocated)", "peak_vram_allocated_bytes", "{:,.0f} B"),
        ("peak VRAM (NVML)", "peak_vram_nvml_bytes", "{:,.0f} B"),
        ("floor per token (slowest link)", "floor_s", "{:.4f} s"),
        ("per-token time / floor", "floor_ratio", "{:.1f}x"),
        ("transformers generate, per token", "reference_tpot_s", "{:.4f} s"),
        ("per-token time vs transformers", "tpot_ratio_vs_reference", "{:.1f}x"),
        ("top-1 agreement vs uncompressed", "quality_top1_agreement", "{:.3f}"),
        ("KL vs uncompressed (mean)", "quality_kl_mean", "{:.4f}"),
        ("perplexity / uncompressed", None, None),
    ]
    for label, key, fmt in rows:
        if key is None:
            if label.startswith("per-token") and "token_latency_p50_s" in metrics:
                table.add_row(label, f"{metrics['token_latency_p50_s']:.3f} / {metrics['token_latency_p90_s']:.3f} s")
            if label.startswith("perplexity") and "quality_ppl" in metrics:
                table.add_row(label, f"{metrics['quality_ppl']:.2f} / {metrics['quality_ppl_reference']:.2f}")
        elif key in metrics:
            table.add_row(label, fmt.format(metrics[key]))
    console.print(table)
    console.print(f"[bold]generated:[/bold] {text!r}")
