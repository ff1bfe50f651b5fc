"""The link probe: how fast each link a streamed layer crosses really is on this machine, and the
per-token floor those rates imply.

`python -m harness.probe` measures the link rates (or reads them from the per-machine cache) and
prints them as a table.
"""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from harness.allocator import POLICIES, host_malloc
from harness.device import resolve_device
from harness.probe.links import CODEC_4BIT, CODEC_8BIT, LinkRates
from harness.probe.store import cache_path, implausible, load_or_measure


def _rates_table(rates: LinkRates, title: str) -> object:
    from rich.table import Table

    rows = [
        ("disk read, cold", rates.disk_read_cold_bytes_per_s, "page cache dropped first (posix_fadvise)"),
        ("disk read, warm", rates.page_cache_bytes_per_s, "a kept mapping made resident from the page cache"),
        ("host copy", rates.host_copy_bytes_per_s, "torch copy_ in host memory"),
        ("host -> device, pinned", rates.h2d_pinned_bytes_per_s, ""),
        ("host -> device, pageable", rates.h2d_pageable_bytes_per_s, ""),
        ("dequant 8-bit", rates.dequant_8bit_bytes_per_s, f"blockwise b{CODEC_8BIT.blocksize}, decoded bytes"),
        (
            "dequant 4-bit",
            rates.dequant_4bit_bytes_per_s,
            f"{CODEC_4BIT.quant_type} b{CODEC_4BIT.blocksize}, decoded bytes",
        ),
    ]
    table = Table(title=title)
    table.add_column("link")
    table.add_column("GB/s", justify="right")
    table.add_column("note")
    for name, rate, note in rows:
        table.add_row(
            name, "n/a" if rate is None else f"{rate / 1e9:.2f}", note if rate is not None else "no such link"
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--refresh", action="store_true", help="measure again even if a cached result exists")
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/probe"))
    parser.add_argument(
        "--scratch-dir", type=Path, default=None, help="where the disk test file goes (default: the cache dir)"
    )
    parser.add_argument("--size-mib", type=int, default=256, help="bytes moved per disk/copy measurement")
    parser.add_argument("--host-malloc", choices=POLICIES, default="reuse",
                        help="how host memory is allocated, as the jobs' bench.host_malloc (cached apart)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from rich.console import Console

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    with host_malloc(args.host_malloc):
        rates = load_or_measure(
            device, args.cache_dir, args.scratch_dir or args.cache_dir, refresh=args.refresh,
            size_bytes=args.size_mib << 20,
        )
        cached = cache_path(device, args.cache_dir)
    title = f"link rates: {rates.device}, {socket.gethostname()}, measured {rates.measured_at}"
    Console().print(_rates_table(rates, title))
    print(f"cached in {cached}")
    for problem in implausible(rates):  # measured so just now: the machine stalled, or a link is broken
        print(f"warning: implausible rate, {problem}: measure again with --refresh on a quiet machine")
