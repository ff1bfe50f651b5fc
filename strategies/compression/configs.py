"""compression options' configs: plain dataclasses, so composing a config imports no torch or bitsandbytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from strategies.checks import check_choice

# bitsandbytes' blockwise kernels take these block sizes (powers of two, 64..4096).
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class CompressionConfig:
    name: str = MISSING
    _target_: str = MISSING
    # Bits a stored weight takes, for a codec that quantizes; None where the weights stay as the checkpoint has them.
    bits: ClassVar[int | None] = None


@dataclass
class NoCompressionConfig(CompressionConfig):
    name: str = "none"
    _target_: str = "strategies.compression.none.NoCompression"


@dataclass
class Blockwise8bitConfig(CompressionConfig):
    name: str = "8bit"
    _target_: str = "strategies.compression.blockwise_8bit.Blockwise8bit"
    bits: ClassVar[int | None] = 8
    # 256: one fp32 scale per 256 weights costs 1.6% on top of the int8 codes.
    blocksize: int = 256
    # Embedding and lm_head are gathers / the final projection; compressing them is a separate trade-off.
    compress_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("compression.blocksize", self.blocksize, BLOCKSIZES)


@dataclass
class Blockwise4bitConfig(CompressionConfig):
    name: str = "4bit"
    _target_: str = "strategies.compression.blockwise_4bit.Blockwise4bit"
    bits: ClassVar[int | None] = 4
    # nf4: levels at normal quantiles, the better fit for normally distributed weights (QLoRA).
    quant_type: str = "nf4"
    # 64 is bitsandbytes' default for 4-bit: an fp32 scale per 64 weights (+12.5% on the codes).
    blocksize: int = 64
    # Quantize the scales themselves to 8 bit (saves ~0.4 bit/weight at a small decode cost).
    double_quant: bool = False
    compress_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("compression.quant_type", self.quant_type, QUANT_TYPES)
        check_choice("compression.blocksize", self.blocksize, BLOCKSIZES)
