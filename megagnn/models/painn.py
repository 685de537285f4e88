"""PaiNN-style equivariant message passing with scalar and vector channels (Schütt et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from megagnn.models.edges import Edges
from megagnn.models.radial import RadialFilter
from megagnn.ops import painn_message

# s [N, H] ([N/tp, H] in node-parallel regions), v [N, 3, H/tp]
State = tuple[torch.Tensor, torch.Tensor]


class PaiNNMessage(nn.Module):
    """Eqs. 7-8: Δs_i = Σ_j φ_s(s_j) ⊙ W_s(r_ij);  Δv_i = Σ_j v_j ⊙ φ_vv W_vv + φ_vs W_vs r̂_ij."""

    def __init__(self, hidden: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.phi = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden)
        )
        # radial MLP (as in NequIP/MACE) rather than PaiNN's single linear layer.
        # The 3H outputs of phi and filter are channel-major (channel c, part k at 3c + k), so
        # a contiguous split over tensor-parallel ranks keeps all three parts of each channel
        self.filter = RadialFilter(num_rbf, radial_hidden, 3 * hidden, nn.SiLU())
        # tensor-parallel boundary: Δs is computed on this rank's channels, s is replicated
        self.gather_ds = nn.Identity()

    def forward(self, s: torch.Tensor, v: torch.Tensor, edges: Edges) -> State:
        # gather -> filter ⊙ message -> segment sum, fused on GPUs
        phi = self.phi(s)  # [N, 3H/tp]
        # [N, H/tp], [N, 3, H/tp]
        ds, dv = edges.map(lambda e: painn_message(phi, v, e, self.filter))
        ds, dv = ds * edges.inv_avg_neighbors, dv * edges.inv_avg_neighbors
        return s + self.gather_ds(ds), v + dv


class PaiNNUpdate(nn.Module):
    """Eqs. 9-11: channel mixing of v by U, V; gates from [s, ||V v||]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.U = nn.Linear(hidden, hidden, bias=False)
        self.V = nn.Linear(hidden, hidden, bias=False)
        # tensor-parallel boundary: v lives on this rank's channels, Δv is computed in full
        self.split_dv = nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden)
        )

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> State:
        uv, vv = self.U(v), self.V(v)  # [N, 3, H]
        # eps keeps the norm twice differentiable at v = 0 (the first block's input)
        vnorm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)  # [N, H]
        a = self.mlp(torch.cat([s, vnorm], dim=-1))  # [N, 3H]
        a_vv, a_sv, a_ss = torch.split(a, self.hidden, dim=-1)
        ds = a_ss + a_sv * (uv * vv).sum(dim=1)  # [N, H]
        dv = a_vv.unsqueeze(1) * uv  # [N, 3, H]
        return s + ds, v + self.split_dv(dv)


class PaiNNBlock(nn.Module):
    def __init__(self, hidden: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        self.message = PaiNNMessage(hidden, num_rbf, radial_hidden)
        self.update = PaiNNUpdate(hidden)

    def forward(self, state: State, edges: Edges) -> State:
        return self.update(*self.message(*state, edges))


class PaiNN(nn.Module):
    """Embedding -> L equivariant blocks -> per-atom scalar features [N, H].

    The node state between blocks is ``(s, v)``; ``pack``/``unpack`` turn it into one
    [N, H + 3 H/tp] tensor for pipeline stages. ``split_nodes``/``gather_nodes`` are where
    tensor parallelism may enter and leave a node-parallel region (for s; v stays split by
    channels).
    """

    def __init__(self, hidden: int, layers: int, num_rbf: int, max_z: int, radial_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(
            PaiNNBlock(hidden, num_rbf, radial_hidden) for _ in range(layers)
        )
        # vector channels held by this rank: H, or H/tp once tensor parallelism splits them
        self.vector_channels = hidden
        self.split_nodes = nn.Identity()
        self.gather_nodes = nn.Identity()

    def embed(self, atomic_numbers: torch.Tensor) -> State:
        s = self.embedding(atomic_numbers)  # [N, H]
        v = s.new_zeros((s.shape[0], 3, self.vector_channels))  # v = 0: [N, 3, H/tp]
        return self.split_nodes(s), v

    def scalars(self, state: State) -> torch.Tensor:
        return self.gather_nodes(state[0])  # [N, H]

    @staticmethod
    def pack(state: State) -> torch.Tensor:  # -> [n, H + 3 H/tp · N/n], n = rows of s
        s, v = state
        return torch.cat([s, v.reshape(s.shape[0], -1)], dim=1)

    def unpack(self, x: torch.Tensor) -> State:
        s, v = x.split([self.hidden, x.shape[1] - self.hidden], dim=1)
        return s, v.reshape(-1, 3, self.vector_channels)
