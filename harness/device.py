"""Which torch device a run uses; kept light so CLIs can import it without MLflow or Hydra."""

from __future__ import annotations

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
