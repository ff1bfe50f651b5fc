"""cache options' configs: plain dataclasses, so composing a config imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from strategies.checks import check_choice

PAGE_CACHE_STATES = ("warm", "cold")


@dataclass
class CacheConfig:
    name: str = MISSING
    _target_: str = MISSING
    # cold: drop the file's pages from the OS page cache before each read, so "from disk"
    # really is from disk (the seed's numbers were); warm: whatever the OS kept.
    page_cache: str = "warm"

    def __post_init__(self) -> None:
        check_choice("cache.page_cache", self.page_cache, PAGE_CACHE_STATES)


@dataclass
class DiskCacheConfig(CacheConfig):
    name: str = "disk"
    _target_: str = "strategies.cache.disk.DiskCache"


@dataclass
class RamCacheConfig(CacheConfig):
    name: str = "ram"
    _target_: str = "strategies.cache.ram.RamCache"
