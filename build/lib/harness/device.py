"""Which torch device a run uses; kept light so CLIs can import it without MLflow or Hydra."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device: use device=cpu or device=auto")
    return torch.device(name)
