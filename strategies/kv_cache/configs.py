"""kv_cache options' configs: plain dataclasses, so composing a config imports no torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from strategies.checks import check_choice, check_positive

# kv_cache=quantized: 8 bits as transformers' float8 layer (per-tensor scale, every position quantized); 4 and
# 2 as optimum-quanto's grouped integers, with the newest `residual` positions kept unquantized.
KV_BITS = (2, 4, 8)


@dataclass
class KVCacheConfig:
    name: str = MISSING
    _target_: str = MISSING
    # Whether each pass recomputes the whole sequence, keeping no K/V between passes.
    recomputes_sequence: ClassVar[bool] = False
    # Whether the cache changes the keys and values it keeps (quantized): its quality is then measured.
    lossy: ClassVar[bool] = False


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


@dataclass
class QuantizedKVCacheConfig(KVCacheConfig):
    name: str = "quantized"
    _target_: str = "strategies.kv_cache.quantized.QuantizedKVCache"
    lossy: ClassVar[bool] = True
    bits: int = 4
    # 4 and 2 bits: positions kept unquantized at the end of the cache before they are quantized in one go.
    residual: int = 128
    # 4 and 2 bits: values per quantization group along the head dimension; it must divide head_dim (the tiny
    # model's is 32, Llama-3's 128).
    group_size: int = 32

    def __post_init__(self) -> None:
        check_choice("kv_cache.bits", self.bits, KV_BITS)
        check_positive("kv_cache.residual", self.residual)
        check_positive("kv_cache.group_size", self.group_size)
