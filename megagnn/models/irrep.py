"""IrrepNet: higher-order equivariant message passing (NequIP / MACE-style interactions).

Node features are irreducible representations of O(3) up to degree L, stored as
``x [N, (L+1)², C]``: rows l² ... (l+1)² - 1 hold the 2l + 1 components of degree l (parity
(-1)^l), every degree with the same C channels, so tensor parallelism splits the last axis
like any other width. A block (the interaction of NequIP, Batzner et al. 2022, with MACE's
channel-wise couplings, Batatia et al. 2022; no many-body product yet):

    y_j   = W_up^l x_j                                 per-degree channel mixing
    m_ij  = Σ_p R_p(r_ij) ⊙ (y_j^{l1} ⊗ Y^{l2}(r̂_ij))^{l3}    channel-wise tensor product
    m_i   = Σ_j e(r_ij) m_ij / n_avg
    x_i  += Gate(W_out^l m_i)

over the paths p = (l1, l2, l3) with |l1 - l2| <= l3 <= l1 + l2 and l1 + l2 + l3 even (the
products that keep natural parity, so the model is E(3)-equivariant, reflections included).
R_p is a radial MLP of the edge length with one weight per path and channel; the Gate
multiplies degree l > 0 channels by sigmoids of extra scalars and passes scalars through
SiLU (Weiler et al. 2018). Spherical harmonics (component normalisation) and the
Clebsch-Gordan coefficients are e3nn's, in its real basis (e3nn is well tested, its
harmonics are plain polynomials that differentiate twice and export); the contraction is
one einsum per path, written out so tensor parallelism and later a fused kernel see it.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from megagnn.models.edges import Edges


def paths(lmax: int) -> list[tuple[int, int, int]]:
    """(l1 feature, l2 harmonic, l3 output) products of natural parity, in a fixed order."""
    return [
        (l1, l2, l3)
        for l1 in range(lmax + 1)
        for l2 in range(lmax + 1)
        for l3 in range(abs(l1 - l2), min(l1 + l2, lmax) + 1)
        if (l1 + l2 + l3) % 2 == 0
    ]


@functools.lru_cache(maxsize=64)
def clebsch_gordan(l1: int, l2: int, l3: int) -> torch.Tensor:
    """Clebsch-Gordan coefficients [2l1+1, 2l2+1, 2l3+1] (e3nn's wigner_3j, real basis) in
    fp64 on the host, scaled so each output component has unit variance for unit-variance
    inputs. Computed once per path, outside any trace: the package sees constants."""
    from e3nn import o3

    with torch.device("cpu"):  # also when the model is built on the meta device
        return o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)


def spherical_harmonics(lmax: int, unit: torch.Tensor) -> torch.Tensor:
    """Y^l_m(r̂) for l <= lmax, [E, (lmax+1)²], component normalisation (|Y^l|² = 2l+1)."""
    from e3nn import o3

    return o3.spherical_harmonics(
        list(range(lmax + 1)), unit, normalize=False, normalization="component"
    )


def degree(x: torch.Tensor, l: int) -> torch.Tensor:
    """The degree-l components of ``x [..., (L+1)², C]``: [..., 2l+1, C]."""
    return x[..., l * l : (l + 1) * (l + 1), :]


class DegreeLinear(nn.Module):
    """A channel mixing per degree (W^l [C_out, C_in], a bias on scalars only): equivariant,
    since it acts on channels and never on the 2l + 1 components."""

    def __init__(self, lmax: int, c_in: int, c_out: int, scalar_out: int | None = None):
        super().__init__()
        self.lmax = lmax
        self.linears = nn.ModuleList(
            nn.Linear(c_in, scalar_out if l == 0 and scalar_out else c_out, bias=l == 0)
            for l in range(lmax + 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # -> [N, 2l+1, C_out] per l
        return [lin(degree(x, l)) for l, lin in enumerate(self.linears)]


class IrrepBlock(nn.Module):
    def __init__(self, hidden: int, lmax: int, num_rbf: int, radial_hidden: int):
        super().__init__()
        self.hidden, self.lmax = hidden, lmax
        self.paths = paths(lmax)
        for p in self.paths:
            clebsch_gordan(*p)  # computed now, not inside an export trace
        self.up = DegreeLinear(lmax, hidden, hidden)
        # radial weights, channel-major (channel c, path p at c * P + p): a contiguous split
        # over tensor-parallel ranks keeps every path of a channel together
        self.radial = nn.Sequential(
            nn.Linear(num_rbf, radial_hidden),
            nn.SiLU(),
            nn.Linear(radial_hidden, len(self.paths) * hidden),
        )
        # out: scalars get C outputs plus one gate per channel of every degree l > 0
        self.out = DegreeLinear(lmax, hidden, hidden, scalar_out=(lmax + 1) * hidden)
        self.into = {l3: sum(p[2] == l3 for p in self.paths) for l3 in range(lmax + 1)}

    def forward(self, state: tuple[torch.Tensor], edges: Edges) -> tuple[torch.Tensor]:
        (x,) = state  # [N, (L+1)², C]
        y = self.up(x)  # per degree [N, 2l+1, C/tp]
        sh = spherical_harmonics(self.lmax, edges.unit).to(x.dtype)  # [E, (L+1)²]
        channels = y[0].shape[-1]
        w = self.radial(edges.rbf) * edges.envelope.unsqueeze(-1).to(x.dtype)
        w = w.view(-1, channels, len(self.paths))  # [E, C/tp, P]
        sender = edges.sender
        out = [0.0] * (self.lmax + 1)
        for p, (l1, l2, l3) in enumerate(self.paths):
            cg = clebsch_gordan(l1, l2, l3).to(device=x.device, dtype=x.dtype)
            ylm = sh[:, l2 * l2 : (l2 + 1) * (l2 + 1)]  # [E, 2l2+1]
            # (y_j^{l1} ⊗ Y^{l2})^{l3} per channel, weighted by the radial MLP
            # two-operand contractions: a three-operand einsum picks its order from the
            # sizes, which an export with symbolic edge counts cannot follow
            coupling = torch.einsum("eb,abk->eak", ylm, cg)  # [E, 2l1+1, 2l3+1]
            prod = torch.einsum("eac,eak->ekc", y[l1][sender], coupling)  # [E, 2l3+1, C/tp]
            out[l3] = out[l3] + prod * w[:, None, :, p]
        messages = torch.cat(
            [out[l] / math.sqrt(self.into[l]) for l in range(self.lmax + 1)], dim=1
        )  # [E, (L+1)², C/tp]
        agg = edges.aggregate(messages) * edges.inv_avg_neighbors  # [N, (L+1)², C/tp]
        mixed = self.out(agg)  # scalars [N, 1, (L+1) C], degrees l > 0 [N, 2l+1, C]
        scalars, gates = mixed[0][..., : self.hidden], mixed[0][..., self.hidden :]
        update = [nn.functional.silu(scalars)]
        for l in range(1, self.lmax + 1):
            gate = torch.sigmoid(gates[..., (l - 1) * self.hidden : l * self.hidden])
            update.append(mixed[l] * gate)  # [N, 2l+1, C] x [N, 1, C]
        return (x + torch.cat(update, dim=1),)


class IrrepNet(nn.Module):
    """Embedding (scalars from Z, higher degrees zero) -> L blocks -> per-atom scalars
    [N, C]. Node state ``(x,)`` with x [N, (L+1)², C]; ``pack``/``unpack`` flatten it for
    pipeline stages."""

    def __init__(
        self,
        hidden: int,
        layers: int,
        num_rbf: int,
        max_z: int,
        radial_hidden: int,
        lmax: int = 2,
    ):
        super().__init__()
        self.hidden, self.lmax = hidden, lmax
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(
            IrrepBlock(hidden, lmax, num_rbf, radial_hidden) for _ in range(layers)
        )

    def embed(self, atomic_numbers: torch.Tensor) -> tuple[torch.Tensor]:
        s = self.embedding(atomic_numbers)  # [N, C]
        rest = s.new_zeros(s.shape[0], (self.lmax + 1) ** 2 - 1, s.shape[1])
        return (torch.cat([s.unsqueeze(1), rest], dim=1),)  # [N, (L+1)², C]

    def scalars(self, state: tuple[torch.Tensor]) -> torch.Tensor:
        return state[0][:, 0, :]  # [N, C]

    def pack(self, state: tuple[torch.Tensor]) -> torch.Tensor:
        return state[0].flatten(1)  # [N, (L+1)² C]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.view(x.shape[0], (self.lmax + 1) ** 2, self.hidden),)
