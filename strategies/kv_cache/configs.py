"""kv_cache options' configs: plain dataclasses, so composing a config imports no torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING


@dataclass
class KVCacheConfig:
    name: str = MISSING
    _target_: str = MISSING
    # Whether each pass recomputes the whole sequence, keeping no K/V between passes.
    recomputes_sequence: ClassVar[bool] = False


@dataclass
class NoKVCacheConfig(KVCacheConfig):
    name: str = "none"
    _target_: str = "strategies.kv_cache.none.NoKVCache"
    recomputes_sequence: ClassVar[bool] = True


@dataclass
class DeviceKVCacheConfig(KVCacheConfig):
    name: str = "device"
    _target_: str = "strategies.kv_cache.device.DeviceKVCache"


@dataclass
class OffloadKVCacheConfig(KVCacheConfig):
    name: str = "offload"
    _target_: str = "strategies.kv_cache.offload.OffloadKVCache"
