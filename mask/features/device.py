"""The torch device a detector backend runs on (shared by the BUTD and detectron2 backends)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("detector.device=cuda but no CUDA device is available")
    return torch.device(name)
