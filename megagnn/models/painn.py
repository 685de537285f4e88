"""PaiNN-style equivariant message passing with scalar and vector channels (Schütt et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from megagnn.ops import segment_sum


class PaiNNMessage(nn.Module):
    """Eqs. 7-8: Δs_i = Σ_j φ_s(s_j) ⊙ W_s(r_ij);  Δv_i = Σ_j v_j ⊙ φ_vv W_vv + φ_vs W_vs r̂_ij."""

    def __init__(self, hidden: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.phi = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden)
        )
        # radial MLP (as in NequIP/MACE) rather than PaiNN's single linear layer
        self.filter = nn.Sequential(
            nn.Linear(num_rbf, radial_hidden), nn.SiLU(), nn.Linear(radial_hidden, 3 * hidden)
        )
        # tensor-parallel boundary: Δs is computed on this rank's channels, s is replicated
        self.gather_ds = nn.Identity()

    def forward(self, s, v, edge_index, rbf, envelope, unit, inv_avg_neighbors):
        sender, receiver = edge_index
        n = s.shape[0]
        w = self.filter(rbf) * envelope.unsqueeze(-1)  # [E, 3H]
        x = self.phi(s)[sender] * w  # [E, 3H]
        x_s, x_vv, x_vs = x.chunk(3, dim=-1)  # [E, H/tp] each
        v_msg = v[sender] * x_vv.unsqueeze(1) + unit.to(x_vs.dtype).unsqueeze(-1) * x_vs.unsqueeze(
            1
        )
        ds = segment_sum(x_s, receiver, n) * inv_avg_neighbors  # [N, H/tp]
        dv = segment_sum(v_msg, receiver, n) * inv_avg_neighbors  # [N, 3, H/tp]
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

    def forward(self, s, v):
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

    def forward(self, s, v, edge_index, rbf, envelope, unit, inv_avg_neighbors):
        s, v = self.message(s, v, edge_index, rbf, envelope, unit, inv_avg_neighbors)
        return self.update(s, v)


class PaiNN(nn.Module):
    """Embedding -> L equivariant blocks -> per-atom scalar features [N, H]."""

    def __init__(self, hidden: int, layers: int, num_rbf: int, max_z: int, radial_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(
            PaiNNBlock(hidden, num_rbf, radial_hidden) for _ in range(layers)
        )

    def forward(self, atomic_numbers, edge_index, rbf, envelope, unit, inv_avg_neighbors):
        s = self.embedding(atomic_numbers)  # [N, H]
        # vector channels held by this rank: U's input width (H, or H/tp under tensor parallel)
        v = s.new_zeros((s.shape[0], 3, self.blocks[0].update.U.weight.shape[1]))  # [N, 3, H/tp]
        for block in self.blocks:
            s, v = block(s, v, edge_index, rbf, envelope, unit, inv_avg_neighbors)
        return s
