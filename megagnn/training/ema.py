"""Exponential moving average of the weights (Polyak averaging; MACE and NequIP use it by
default): w_ema <- d w_ema + (1 - d) w after every optimizer step.

Each rank averages the parameters it holds, so the average is sharded exactly like the
weights (megagnn.checkpoint.sharded saves it as ``ema.<name>`` beside ``model.<name>``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightAverage:
    """The average of this rank's parameters, frozen ones included (they stay equal)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = list(model.parameters())
        self.shadow = {p: p.detach().clone() for p in self.params}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: ramped up while the average holds few steps, so the
        random initialisation is forgotten fast (torch_ema's ``use_num_updates``)."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(list(self.shadow.values()), self.params, weight)
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for p in self.params:
            tmp = p.detach().clone()
            p.copy_(self.shadow[p])
            self.shadow[p].copy_(tmp)

    @contextlib.contextmanager
    def applied(self):
        """Swap the averaged weights into the model for the duration (validation, saving
        ``best``), then back."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])


def averaged(model: nn.Module, average: WeightAverage | None):
    """A context with the averaged weights in ``model`` (a no-op without an average)."""
    return average.applied() if average is not None else contextlib.nullcontext()
