"""SchNet-style continuous-filter convolution network (Schütt et al. 2018)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from megagnn.ops import segment_sum


class ShiftedSoftplus(nn.Module):
    """ssp(x) = softplus(x) - log 2 (SchNet eq. 6): smooth, zero at zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) - math.log(2.0)


class SchNetBlock(nn.Module):
    """h_i += f2out( Σ_j in2f(h)_j ⊙ W(rbf_ij) u(r_ij) / n_avg )  (SchNet eqs. 3-5).

    Written as gather -> message -> segment sum -> update so that tensor parallelism can
    split the H channels (in2f, filter: column-parallel; f2out's last linear: row-parallel).
    """

    def __init__(self, hidden: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        self.filter = nn.Sequential(
            nn.Linear(num_rbf, radial_hidden), ShiftedSoftplus(), nn.Linear(radial_hidden, hidden)
        )
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.f2out = nn.Sequential(
            nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden)
        )

    def forward(
        self,
        h: torch.Tensor,  # [N, H]
        edge_index: torch.Tensor,  # [2, E]
        rbf: torch.Tensor,  # [E, K]
        envelope: torch.Tensor,  # [E]
        inv_avg_neighbors: float,
    ) -> torch.Tensor:
        sender, receiver = edge_index
        w = self.filter(rbf) * envelope.unsqueeze(-1)  # [E, H]
        x = self.in2f(h)  # [N, H]
        message = x[sender] * w  # [E, H]
        agg = segment_sum(message, receiver, h.shape[0]) * inv_avg_neighbors  # [N, H]
        return h + self.f2out(agg)


class SchNet(nn.Module):
    """Embedding -> L continuous-filter blocks -> per-atom scalar features [N, H]."""

    def __init__(self, hidden: int, layers: int, num_rbf: int, max_z: int, radial_hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(
            SchNetBlock(hidden, num_rbf, radial_hidden) for _ in range(layers)
        )

    def forward(self, atomic_numbers, edge_index, rbf, envelope, unit, inv_avg_neighbors):
        h = self.embedding(atomic_numbers)  # [N, H]
        for block in self.blocks:
            h = block(h, edge_index, rbf, envelope, inv_avg_neighbors)
        return h
