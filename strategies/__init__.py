"""Strategy families: how a layer's weights reach the device, and how K/V are kept.

Each family is a subpackage: ``base.py`` holds its protocol, ``configs.py`` every option's
config dataclass (light: no torch), and one module per option its implementation. The
config's ``_target_`` names the implementation class; nothing else maps names to classes.
Nothing here imports from harness/: a split, for instance, reaches a cache only through
the ``LayerFiles`` protocol it implements.
"""

from __future__ import annotations

from typing import Any

from strategies.cache.configs import DiskCacheConfig, RamCacheConfig
from strategies.compression.configs import Blockwise4bitConfig, Blockwise8bitConfig, NoCompressionConfig
from strategies.kv_cache.configs import (
    DeviceKVCacheConfig,
    NoKVCacheConfig,
    OffloadKVCacheConfig,
    QuantizedKVCacheConfig,
)
from strategies.prefetch.configs import PrefetchOffConfig, PrefetchOnConfig
from strategies.residency.configs import AutoResidencyConfig, NoResidencyConfig

FAMILIES = ("cache", "compression", "prefetch", "kv_cache", "residency")


def option_configs() -> dict[str, dict[str, type]]:
    """Every option's config dataclass, by family and option name (for Hydra's ConfigStore)."""
    return {
        "cache": {"disk": DiskCacheConfig, "ram": RamCacheConfig},
        "compression": {"none": NoCompressionConfig, "8bit": Blockwise8bitConfig, "4bit": Blockwise4bitConfig},
        "prefetch": {"off": PrefetchOffConfig, "on": PrefetchOnConfig},
        "kv_cache": {
            "none": NoKVCacheConfig, "device": DeviceKVCacheConfig, "offload": OffloadKVCacheConfig,
            "quantized": QuantizedKVCacheConfig,
        },
        "residency": {"none": NoResidencyConfig, "auto": AutoResidencyConfig},
    }


def build(cfg: Any, **kwargs: Any) -> Any:
    """Build the implementation named by ``cfg._target_``, handing it its own config."""
    import hydra.utils  # here, not at the top: hydra.utils is only needed once a job builds its strategies

    return hydra.utils.get_class(cfg._target_)(cfg, **kwargs)
