"""SchNet-style continuous-filter convolution network (Schütt et al. 2018)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from megagnn.models.edges import Edges
from megagnn.models.radial import RadialFilter
from megagnn.models.scalar import ScalarBackbone
from megagnn.ops import cfconv


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
        self.filter = RadialFilter(num_rbf, radial_hidden, hidden, ShiftedSoftplus())
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.f2out = nn.Sequential(
            nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden)
        )

    def forward(self, state: tuple[torch.Tensor], edges: Edges) -> tuple[torch.Tensor]:
        (h,) = state  # [N, H] ([N/tp, H] in node-parallel regions)
        x = self.in2f(h)  # [N, H/tp]
        # Σ_j x_j ⊙ W(rbf_ij) u_ij: gather -> message -> segment sum, fused on GPUs
        agg = edges.map(lambda e: cfconv(x, e, self.filter))  # [N, H/tp]
        return (h + self.f2out(agg * edges.inv_avg_neighbors),)


class SchNet(ScalarBackbone):
    """Embedding -> L continuous-filter blocks -> per-atom scalar features [N, H]."""

    def __init__(self, hidden: int, layers: int, num_rbf: int, max_z: int, radial_hidden: int):
        super().__init__(hidden, layers, max_z, lambda: SchNetBlock(hidden, num_rbf, radial_hidden))
