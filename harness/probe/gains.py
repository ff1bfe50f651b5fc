"""What changes to the streaming path gain, or would gain, each measured on its own on the machine at hand:
the GPU check's probe step records them beside the link rates (`untried`, `decode_waits` in its JSON)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def untried_gains(
    device: torch.device, scratch: Path, size_bytes: int, buffered_bytes_per_s: float
) -> dict[str, float | str | None]:
    """What two options the streaming path does not take would gain here, so that neither is built unless it
    pays: a cold read with O_DIRECT against the buffered one the disk cache does (`buffered_bytes_per_s`: the
    probe's, just made on a file of the same size), and decoding into a reused buffer against allocating each
    decoded weight (CUDA only: bitsandbytes has no CPU kernel that decodes into a buffer)."""
    from harness.probe.links import dequant_rates, direct_read_rate

    gains: dict[str, float | str | None] = {}
    try:
        direct = direct_read_rate(scratch, size_bytes)
        gains.update(cold_read_buffered_bytes_per_s=buffered_bytes_per_s, cold_read_direct_bytes_per_s=direct)
        if device.type == "cuda":
            for reused, key in ((False, "allocated"), (True, "reused")):
                rate8, rate4 = dequant_rates(device, repeats=3, into_reused=reused)
                gains[f"dequant_8bit_{key}_bytes_per_s"], gains[f"dequant_4bit_{key}_bytes_per_s"] = rate8, rate4
    except Exception as exc:  # a question for later, never the end of the check
        log.exception("measuring the untried options failed")
        gains["failed"] = f"{type(exc).__name__}: {exc}"
    return gains


def decode_waits(device: torch.device, model: str, repeats: int = 3) -> dict[str, float]:
    """The prefetch worker's host time to issue one decoder layer's 4-bit decode (default codec; `model`'s geometry
    and dtype) while the layer's copy is still in flight, two ways, best of `repeats`:

    - `record_per_call`: each weight's quant-state record read from the device tensors every call, as
      bitsandbytes' `QuantState.from_dict` does: on CUDA each read is a copy to the host that waits for the copy
      in flight and every decode before it;
    - `record_kept`: the codec's way, each record read once, before the timed calls.

    The copy in flight is the layer's stored bytes, host to device from pinned memory, on a stream of its own
    that the decode stream waits for, as in prefetch=on. On the CPU nothing is in flight: both are host work."""
    import bitsandbytes.functional as bnbf
    import torch
    from accelerate import init_empty_weights
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from harness.checkpoints.generated import llama_config_for
    from harness.checkpoints.tokenizer import build_tokenizer
    from harness.compose import compose_config
    from harness.measurement.vram import model_dtype
    from strategies.compression.blockwise import group_stored
    from strategies.compression.blockwise_4bit import Blockwise4bit
    from strategies.compression.configs import Blockwise4bitConfig

    config = llama_config_for(compose_config([f"model={model}"]).model, len(build_tokenizer()))  # as generated
    with init_empty_weights():
        layer = LlamaDecoderLayer(config, 0)
    dtype = model_dtype(config)
    codec = Blockwise4bit(Blockwise4bitConfig())
    weights = {name: torch.randn(p.shape, dtype=dtype, device=device) for name, p in layer.named_parameters()}
    stored = {k: t.to(device) for k, t in codec.encode("layers.00", weights).items()}  # records too, as copied
    del weights
    codec.decode("layers.00", stored, device)  # reads the records, once, as a run's first pass does
    cuda = device.type == "cuda"
    in_flight = torch.empty(sum(t.nbytes for t in stored.values()), dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty_like(in_flight, device=device)
    copy_stream, decode_stream = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if cuda else (None, None)

    def per_call() -> None:
        for parts in group_stored(stored)[1].values():
            codes = parts.pop("q")
            bnbf.dequantize_4bit(codes, bnbf.QuantState.from_dict(parts, device))

    def kept() -> None:
        codec.decode("layers.00", stored, device)

    def issue_seconds(decode: Callable[[], None]) -> float:
        if not cuda:
            t0 = time.perf_counter()
            decode()
            return time.perf_counter() - t0
        torch.cuda.synchronize(device)
        with torch.cuda.stream(copy_stream):
            target.copy_(in_flight, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        with torch.cuda.stream(decode_stream):
            decode_stream.wait_event(copied)
            t0 = time.perf_counter()
            decode()
            issued = time.perf_counter() - t0
        torch.cuda.synchronize(device)
        return issued

    seconds = {}
    for name, decode in (("record_per_call", per_call), ("record_kept", kept)):
        seconds[f"decode_issue_{name}_s"] = min(issue_seconds(decode) for _ in range(repeats))
    seconds["layer_stored_bytes"] = float(in_flight.numel())
    return seconds
