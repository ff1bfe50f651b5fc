"""cache options' configs: plain dataclasses, so composing a config imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from strategies.checks import check_choice

PAGE_CACHE_STATES = ("warm", "cold")


@dataclass
class CacheConfig:
    name: str = MISSING
    _target_: str = MISSING
    # Whether the option reads the layer files again at each pass (disk) or keeps host copies (ram).
    rereads: ClassVar[bool]
    # cold: drop the file's pages from the OS page cache before each read, so "from disk"
    # really is from disk (the seed's numbers were); warm: whatever the OS kept.
    page_cache: str = "warm"

    def __post_init__(self) -> None:
        check_choice("cache.page_cache", self.page_cache, PAGE_CACHE_STATES)

    @property
    def cold(self) -> bool:
        """Whether each read starts from storage (page_cache=cold), not from what the OS kept."""
        return self.page_cache == "cold"


@dataclass
class DiskCacheConfig(CacheConfig):
    name: str = "disk"
    _target_: str = "strategies.cache.disk.DiskCache"
    rereads: ClassVar[bool] = True


@dataclass
class RamCacheConfig(CacheConfig):
    name: str = "ram"
    _target_: str = "strategies.cache.ram.RamCache"
    rereads: ClassVar[bool] = False
