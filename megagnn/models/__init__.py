"""Backbones, heads and the potential that ties them together."""

from __future__ import annotations

import torch

from megagnn.config import ModelConfig
from megagnn.models.potential import Potential


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> Potential:
    """Build the potential; ``device='meta'`` allocates nothing (for sizing huge models)."""
    if device is None:
        return Potential(cfg)
    with torch.device(device):
        return Potential(cfg)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Potential", "build_model", "count_parameters"]
