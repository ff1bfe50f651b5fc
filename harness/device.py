"""Which torch device a run uses; kept light so CLIs can import it without MLflow or Hydra."""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but torch sees no CUDA device: use device=cpu or device=auto")
    return indexed_device(torch.device(name))


def indexed_device(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current index>`: names and cache files then say which GPU was measured, and
    torch calls that take one device (the allocator's memory fraction) and `tensor.device ==` checks
    (a tensor on the GPU always reports its index) see the same device as the tensors."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def last_level_cache_bytes(device: torch.device, sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The device's last-level cache: a GPU's L2, or the highest-level cache of the CPU's first core as sysfs lists
    it. Where sysfs says nothing, 64 MiB (more than most CPUs' last level, so that evicting it evicts it all)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(indexed_device(device)).L2_cache_size)
    levels = {}
    for index in sysfs.glob("index*"):
        try:
            level, size = (index / "level").read_text().strip(), (index / "size").read_text().strip()
            levels[int(level)] = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1:], 0)
        except (OSError, ValueError):
            continue
    return levels[max(levels)] if levels else 64 << 20
