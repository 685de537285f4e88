"""How long a run trains and what it spent: steps from epochs or a FLOP budget, compute
accounting (FLOPs, atoms, wall time) and early stopping on the validation loss.

A scaling study needs each point trained to its own end: long enough for its data (epochs,
or early stopping with patience) or for its compute budget, never a step count shared by
all points. Every run records its compute C so the points can be placed on a compute axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from megagnn.config import TrainConfig
from megagnn.parallel.state import ParallelState


def count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the FLOPs of the matmuls it ran (forward and every backward, the force
    loss's double backward included), as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, float(counter.get_total_flops())


def flops_per_atom(flops: float, atoms: int, par: ParallelState, device: torch.device) -> float:
    """FLOPs per atom of the whole job from one step's count on each rank: FLOPs summed over
    every rank, atoms over the data-parallel replicas (a replica's ranks share its atoms)."""
    totals = torch.tensor([flops, float(atoms)], dtype=torch.float64, device=device)
    if dist.is_initialized() and par.world_size > 1:
        dist.all_reduce(totals)
    total_flops, total_atoms = totals.tolist()
    return total_flops / max(total_atoms / (par.tp_size * par.pp_size), 1.0)


@dataclass
class Compute:
    """Training compute so far, all ranks together (resumed runs continue the count)."""

    flops_per_atom: float | None = None
    atoms: int = 0
    steps: int = 0
    wall_s: float = 0.0

    @property
    def flops(self) -> float:
        return (self.flops_per_atom or 0.0) * self.atoms

    def add(self, atoms: int) -> None:
        """One optimizer step over ``atoms`` atoms (all replicas)."""
        self.atoms += atoms
        self.steps += 1

    def state_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}

    @classmethod
    def from_state(cls, state: dict | None) -> Compute:
        if not state:
            return cls()
        return cls(**{k: state[k] for k in ("flops_per_atom", "atoms", "steps", "wall_s")})


def planned_steps(
    cfg: TrainConfig, batch_atoms: list[int], dp_size: int, per_atom: float | None = None
) -> int:
    """Optimizer steps of the run: train.max_steps, or enough for train.epochs passes over
    this rank's training batches (``batch_atoms``: atoms of each, every dataset's), or for
    train.flops_budget at ``per_atom`` FLOPs per atom and this rank's mean batch size."""
    per_step = cfg.microbatches
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * len(batch_atoms) / per_step))
    if cfg.flops_budget is not None:
        if not per_atom:
            raise ValueError("train.flops_budget needs the FLOPs per atom measured first")
        mean_atoms = sum(batch_atoms) / max(len(batch_atoms), 1)
        atoms_per_step = mean_atoms * per_step * dp_size
        return max(1, math.ceil(cfg.flops_budget / (per_atom * atoms_per_step)))
    return cfg.max_steps


@dataclass
class EarlyStopping:
    """Tracks the lowest validation loss; ``stop`` once ``patience`` validations in a row
    have not improved on it (patience 0: never)."""

    patience: int = 0
    best_loss: float = math.inf
    best_step: int = -1
    waited: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record a validation; True if it is the best so far."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.waited = loss, step, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)
