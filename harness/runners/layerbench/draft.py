"""The draft of speculative decoding: a small model kept whole on the device beside the streamed target.

By default the target's own 4-bit split (same tokenizer by construction); else a model option whose
tokenizer is the target's. It is held dequantized once when the cap leaves room for that (fastest: no
decode per step), else in its stored form, decoded at each step; refused when neither fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import strategies
from harness.checkpoints.generated import ensure_checkpoint
from harness.checkpoints.loading import load_model_config
from harness.compose import conf_dir
from harness.config import Config, ModelConfig
from harness.measurement.metrics import device_clock
from harness.measurement.timeline import StageClock
from harness.measurement.vram import GIB, decoded_bytes
from harness.split.writer import ensure_split
from harness.streaming.model import StreamingModel
from harness.streaming.pipeline import LayerPipeline
from strategies.cache.configs import DiskCacheConfig
from strategies.compression.configs import Blockwise4bitConfig, CompressionConfig, NoCompressionConfig
from strategies.kv_cache.configs import DeviceKVCacheConfig
from strategies.prefetch.configs import PrefetchOffConfig

log = logging.getLogger(__name__)


@dataclass
class Draft:
    model: StreamingModel
    name: str  # the model option, or "<target> 4bit"
    bytes: int  # what it holds on the device
    decoded_once: bool
    held_as: CompressionConfig  # the form its layers are held in, decoded at each step (none: dequantized once)

    @property
    def options(self) -> dict[str, object]:
        """The strategy options its pipeline runs with (the stream probe prices a draft step with them)."""
        return held_options(self.held_as)


def held_options(held_as: CompressionConfig) -> dict[str, object]:
    """A resident draft's strategy options: every unit is resident, so the cache is never asked and nothing loads
    ahead; its layers decode from `held_as`."""
    return {
        "cache": DiskCacheConfig(), "compression": held_as, "prefetch": PrefetchOffConfig(),
        "kv_cache": DeviceKVCacheConfig(),
    }


def model_option(name: str) -> ModelConfig:
    """A conf/model/ option's config, read directly: the job already runs inside Hydra, which cannot compose twice."""
    path = Path(conf_dir()) / "model" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"decoding.draft={name!r} is no model option: choose one of {', '.join(options)}")
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))


def build_draft(
    cfg: Config, outputs_dir: Path, splits_root: Path, device: torch.device,
    tokenizer: PreTrainedTokenizerBase, budget_bytes: int,
) -> Draft:
    """Split (once) and load the draft resident; `budget_bytes`: device memory left for it."""
    if cfg.decoding.draft is None:
        model, codec_cfg, name = cfg.model, Blockwise4bitConfig(), f"{cfg.model.name} 4bit"
    else:
        model, codec_cfg, name = model_option(cfg.decoding.draft), NoCompressionConfig(), cfg.decoding.draft
    ckpt_dir = ensure_checkpoint(model, outputs_dir)
    if AutoTokenizer.from_pretrained(ckpt_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"decoding.draft={cfg.decoding.draft!r} has another tokenizer than model {cfg.model.name!r}: "
            "a draft proposes the target's token ids, so it must share its tokenizer"
        )
    config = load_model_config(ckpt_dir)
    codec = strategies.build(codec_cfg)
    layout, _ = ensure_split(ckpt_dir, config, codec, splits_root, verify=cfg.split.verify, encode_device=device)
    units = layout.units
    stored = layout.files_bytes(units)
    shared = {u for u in units if u == "lm_head" and layout.file(u) == layout.file("embed")}
    decoded = decoded_bytes(config, [u for u in units if u not in shared])
    decoded_once = decoded <= budget_bytes
    if not decoded_once and stored > budget_bytes:
        raise ValueError(
            f"the draft ({name}) needs {stored / GIB:.2f} GiB resident even in its stored form, and "
            f"{max(budget_bytes, 0) / GIB:.2f} GiB is left beside streaming the target under vram.cap_gib: "
            "raise the cap, or choose a smaller decoding.draft"
        )
    stages = StageClock(device)
    held_as = NoCompressionConfig() if decoded_once else codec_cfg
    options = held_options(held_as)
    pipeline = LayerPipeline(
        cache=strategies.build(options["cache"], files=layout, device=device),
        codec=strategies.build(held_as),
        prefetcher=strategies.build(options["prefetch"], device=device),
        device=device,
        clock=stages,
    )
    held = pipeline.keep_resident(layout, units, decode_with=codec if decoded_once else None)
    kv = strategies.build(options["kv_cache"])
    model = StreamingModel(config, units, pipeline, kv, device, device_clock(device), stages)
    log.info("draft %s resident, %s (%.3g GB)", name, "dequantized once" if decoded_once else "stored", held / 1e9)
    return Draft(model, name, held, decoded_once, held_as)
