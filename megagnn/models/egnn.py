"""E(n)-equivariant graph network (Satorras et al. 2021), invariant form, as in HydraGNN's
EGCL layers used for multi-dataset pretraining.

Eqs. 3, 5, 6 of the paper, with the squared distance replaced by a radial basis and a
smooth cutoff envelope:
    m_ij = φ_e(h_i, h_j, r_ij)        edge message
    m_i  = Σ_j e(r_ij) m_ij / n_avg    aggregation
    h_i += φ_h(h_i, m_i)               node update (residual)
The coordinate update (eq. 4) is left out: the energy is an invariant function of the
positions, forces come from its gradient, and updated coordinates would only feed back
invariant distances (HydraGNN's ``equivariance=False``). Without it every tensor is a
scalar channel and splits like an MLP.

φ_e = W2 σ(A h_i + B h_j + C ρ(r_ij)): its first layer acts on [h_i, h_j, ρ] written as
three products, two of them per node (N-sized, not E-sized matmuls), and W2 has no bias, so
it commutes with the sum over neighbours: m_i = W2 Σ_j e σ(z_ij) / n_avg. Under tensor
parallelism A, B, C are column-parallel, σ and the sum act on each rank's channels, and W2
is row-parallel: one all-reduce for the message, one for the node MLP, per block.
"""

from __future__ import annotations

import torch
from torch import nn

from megagnn.models.edges import Edges
from megagnn.models.scalar import ScalarBackbone


class EGNNBlock(nn.Module):
    def __init__(self, hidden: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        # A h_i and B h_j in one product, channel-major (channel c: A at 2c, B at 2c + 1),
        # so a contiguous split over tensor-parallel ranks keeps both parts of a channel
        self.pair = nn.Linear(hidden, 2 * hidden)
        self.radial = nn.Sequential(  # C ρ(r_ij): a radial MLP, as for the other families
            nn.Linear(num_rbf, radial_hidden), nn.SiLU(), nn.Linear(radial_hidden, hidden)
        )
        self.act = nn.SiLU()
        self.message = nn.Linear(hidden, hidden, bias=False)  # W2, after the sum
        self.node = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, state: tuple[torch.Tensor], edges: Edges) -> tuple[torch.Tensor]:
        (h,) = state  # [N, H] ([N/tp, H] in node-parallel regions)
        ab = self.pair(h)  # [N, 2H/tp]
        a, b = ab[:, 0::2], ab[:, 1::2]  # [N, H/tp] each

        def message(e: Edges) -> torch.Tensor:
            z = a[e.receiver] + b[e.sender] + self.radial(e.rbf)  # [E, H/tp]
            weight = e.envelope.unsqueeze(-1).to(z.dtype)  # [E, 1]
            return e.aggregate(self.act(z) * weight)

        agg = edges.map(message) * edges.inv_avg_neighbors  # [N, H/tp]
        m = self.message(agg)  # [N, H] (all-reduce) or [N/tp, H] (reduce-scatter)
        return (h + self.node(torch.cat([h, m], dim=-1)),)


class EGNN(ScalarBackbone):
    """Embedding -> L EGNN blocks -> per-atom scalar features [N, H]."""

    def __init__(self, hidden: int, layers: int, num_rbf: int, max_z: int, radial_hidden: int):
        super().__init__(hidden, layers, max_z, lambda: EGNNBlock(hidden, num_rbf, radial_hidden))
