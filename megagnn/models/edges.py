"""What every interaction block reads about the neighbour graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Edges:
    """Edge geometry of a batch, computed once and shared by all blocks (and replicated over
    the tensor-parallel group)."""

    index: torch.Tensor  # [2, E] int64 (sender j, receiver i)
    rbf: torch.Tensor  # [E, K] radial basis of |r_ij|
    envelope: torch.Tensor  # [E] smooth cutoff u(|r_ij|)
    unit: torch.Tensor  # [E, 3] r_ij / |r_ij|
    inv_avg_neighbors: torch.Tensor  # [] 1 / mean neighbour count (message normalisation)
    num_nodes: int  # N

    @property
    def sender(self) -> torch.Tensor:  # [E]
        return self.index[0]

    @property
    def receiver(self) -> torch.Tensor:  # [E]
        return self.index[1]
