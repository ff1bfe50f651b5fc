"""The per-token floor that measured link rates imply.

With the links able to overlap (prefetch), one token can never take less than the slowest
link's time for its bytes: that is the floor `token_floor` computes. Plain arithmetic on
`LinkRates`: nothing here measures, so nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from strategies.cache.configs import PAGE_CACHE_STATES
from strategies.checks import check_choice

if TYPE_CHECKING:
    from harness.probe.links import LinkRates

LINKS = ("disk", "host_copy", "h2d", "dequant", "compute")
DEQUANT_BITS = (8, 4)


@dataclass
class Floor:
    floor_s: float  # the slowest link's time for one token
    limiting: str  # which link: one of LINKS
    per_link_s: dict[str, float]


def _link_seconds(link: str, nbytes: float, rate: float | None) -> float:
    if nbytes < 0:
        raise ValueError(f"{link}: negative byte count {nbytes}")
    if nbytes == 0:
        return 0.0  # a link the configuration does not use costs nothing, whatever its rate
    if rate is None:
        raise ValueError(f"{link}: {nbytes} bytes per token, but this device has no such link")
    return nbytes / rate


def token_floor(
    *,
    disk_bytes: float,
    host_bytes: float,
    h2d_bytes: float,
    dequant_bytes: float,
    compute_s: float,
    rates: LinkRates,
    page_cache: str,
    dequant_bits: int | None = None,
) -> Floor:
    """The physical floor of one decode token: each link's bytes per token over its measured rate,
    and `compute_s` (the decoder compute of all layers for one token). The links can overlap, so the
    floor is the slowest one, not their sum.

    disk_bytes: read from storage per token, at the cold rate when `page_cache` is "cold", else warm.
    host_bytes: copied within host memory. h2d_bytes: moved to the device, at the pinned rate (the
    pageable one where no pinned rate was measured); 0 on CPU. dequant_bytes: decoded (output) bytes,
    at the rate of the codec storing `dequant_bits` a weight (8 or 4, required when dequant_bytes > 0; the
    rates were measured at the codecs' default block sizes).
    """
    check_choice("page_cache", page_cache, PAGE_CACHE_STATES)
    if compute_s < 0:
        raise ValueError(f"compute: negative time {compute_s}")
    disk_rate = rates.disk_read_cold_bytes_per_s if page_cache == "cold" else rates.page_cache_bytes_per_s
    h2d_rate = (
        rates.h2d_pinned_bytes_per_s if rates.h2d_pinned_bytes_per_s is not None else rates.h2d_pageable_bytes_per_s
    )
    dequant_rate = None
    if dequant_bytes > 0:
        if dequant_bits is None:
            raise ValueError("dequant_bytes > 0 needs dequant_bits (8 or 4): the rates differ")
        check_choice("dequant_bits", dequant_bits, DEQUANT_BITS)
        dequant_rate = rates.dequant_bytes_per_s(dequant_bits)
    per_link_s = {
        "disk": _link_seconds("disk", disk_bytes, disk_rate),
        "host_copy": _link_seconds("host_copy", host_bytes, rates.host_copy_bytes_per_s),
        "h2d": _link_seconds("h2d", h2d_bytes, h2d_rate),
        "dequant": _link_seconds("dequant", dequant_bytes, dequant_rate),
        "compute": float(compute_s),
    }
    limiting = max(LINKS, key=lambda link: per_link_s[link])  # ties go to the earlier link in LINKS
    return Floor(floor_s=per_link_s[limiting], limiting=limiting, per_link_s=per_link_s)
