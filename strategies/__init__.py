"""Strategy families: how a layer's weights reach the device, and how K/V are kept.

Each family is a subpackage: ``base.py`` holds its protocol and base config, and one
module per option holds that option's config dataclass and implementation. The config's
``_target_`` names the implementation class; nothing else maps names to classes.
"""

from __future__ import annotations

from typing import Any

import hydra.utils


def option_configs() -> dict[str, dict[str, type]]:
    """Every option's config dataclass, by family and option name (for Hydra's ConfigStore)."""
    from strategies.cache.disk import DiskCacheConfig
    from strategies.cache.ram import RamCacheConfig
    from strategies.compression.blockwise_4bit import Blockwise4bitConfig
    from strategies.compression.blockwise_8bit import Blockwise8bitConfig
    from strategies.compression.none import NoCompressionConfig
    from strategies.kv_cache.device import DeviceKVCacheConfig
    from strategies.kv_cache.none import NoKVCacheConfig
    from strategies.kv_cache.offload import OffloadKVCacheConfig
    from strategies.prefetch.off import PrefetchOffConfig
    from strategies.prefetch.on import PrefetchOnConfig

    return {
        "cache": {"disk": DiskCacheConfig, "ram": RamCacheConfig},
        "compression": {"none": NoCompressionConfig, "8bit": Blockwise8bitConfig, "4bit": Blockwise4bitConfig},
        "prefetch": {"off": PrefetchOffConfig, "on": PrefetchOnConfig},
        "kv_cache": {"none": NoKVCacheConfig, "device": DeviceKVCacheConfig, "offload": OffloadKVCacheConfig},
    }


def build(cfg: Any, **kwargs: Any) -> Any:
    """Build the implementation named by ``cfg._target_``, handing it its own config."""
    return hydra.utils.get_class(cfg._target_)(cfg, **kwargs)
