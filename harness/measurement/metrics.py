"""Timing and the metric arithmetic of docs/metrics.md, kept free of I/O so it can run on a fake clock."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

Clock = Callable[[], float]


def device_clock(device: torch.device) -> Clock:
    """A clock that first waits for queued device work, so a reading means the work is done.

    Host timers around asynchronous CUDA calls measure the launch, not the work; one clock
    that syncs serves every stage instead of a CUDA/CPU branch in each.
    """
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def token_metrics(
    start_s: float, token_times_s: Sequence[float], sequences: Sequence[Sequence[int]] = ()
) -> dict[str, float]:
    """TTFT, inter-token latencies and their summary, from the clock readings of one generation.

    `start_s`: the prompt is tokenized; `token_times_s[i]`: new token i is on the host (with a batch,
    `sequences`, step i's tokens).
    Per-token latency covers tokens 2..N (the gaps between consecutive tokens), so a run
    with one new token has a TTFT and no decode figures: they are absent, not zero.
    """
    if not token_times_s:
        raise ValueError("no token was generated")
    metrics = {"ttft_s": token_times_s[0] - start_s, "new_tokens": float(len(token_times_s))}
    gaps = inter_token_latencies(token_times_s)
    if gaps:
        decode_s = token_times_s[-1] - token_times_s[0]
        metrics.update(
            tpot_s=decode_s / len(gaps),
            token_latency_p50_s=percentile(gaps, 50),
            token_latency_p90_s=percentile(gaps, 90),
            token_latency_p99_s=percentile(gaps, 99),
        )
        if decode_s > 0:
            # A batch's step yields a token per live sequence: every sequence's tokens after the first step count.
            decoded = sum(max(len(seq) - 1, 0) for seq in sequences) if len(sequences) > 1 else len(gaps)
            metrics["decode_tokens_per_s"] = decoded / decode_s
    return metrics


def inter_token_latencies(token_times_s: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(token_times_s, token_times_s[1:], strict=False)]


def aggregate(repeats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over repeats; with several, also its std and coefficient of variation."""
    out: dict[str, float] = {}
    for key in repeats[0]:
        values = [r[key] for r in repeats if key in r]
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
            if out[key]:
                out[f"{key}_cv"] = out[f"{key}_std"] / abs(out[key])
    return out
