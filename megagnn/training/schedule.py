"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio · lr."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megagnn.config import OptimConfig


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    max_steps: int,
    progress: Callable[[], float] | None = None,
):
    """The schedule over ``max_steps``, or with ``progress`` (the
    share of a time budget spent, in [0, 1]) over the wall clock after the warmup steps."""
    warmup = max(cfg.warmup_steps, 0)
    decay = max(max_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = progress() if progress is not None else min((step - warmup) / decay, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
