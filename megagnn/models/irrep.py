"""IrrepNet: higher-order equivariant message passing (NequIP / MACE-style interactions).

Node features are irreducible representations of O(3) up to degree L, stored as
``x [N, (L+1)², C]``: rows l² ... (l+1)² - 1 hold the 2l + 1 components of degree l (parity
(-1)^l), every degree with the same C channels, so tensor parallelism splits the last axis
like any other width. A block (the interaction of NequIP, Batzner et al. 2022, with MACE's
channel-wise couplings, Batatia et al. 2022):

    y_j   = W_up^l x_j                                 per-degree channel mixing
    m_ij  = Σ_p R_p(r_ij) ⊙ (y_j^{l1} ⊗ Y^{l2}(r̂_ij))^{l3}    channel-wise tensor product
    A_i   = Σ_j e(r_ij) m_ij / n_avg
    B_i   = A_i [+ Σ_p w_p(s_i) ⊙ (A_i^{l1} ⊗ A_i^{l2})^{l3}]   with model.correlation=2
    x_i  += Gate(W_out^l B_i)

over the paths p = (l1, l2, l3) with |l1 - l2| <= l3 <= l1 + l2 and l1 + l2 + l3 even (the
products that keep natural parity, so the model is E(3)-equivariant, reflections included).
R_p is a radial MLP of the edge length with one weight per path and channel; the Gate
multiplies degree l > 0 channels by sigmoids of extra scalars and passes scalars through
SiLU (Weiler et al. 2018). The optional product is MACE's product basis B to second order
(three-body features from one neighbour sum), per channel, with path weights w_p from a
small MLP of the atom's scalars s_i where MACE keeps a table per element; it acts on atoms,
not edges, so it costs little. Spherical harmonics (component normalisation) and the
Clebsch-Gordan coefficients are e3nn's, in its real basis (e3nn is well tested, its
harmonics are plain polynomials that differentiate twice and export). The contraction is
written out, one batched matmul per output degree over the stacked rows of every path into
it (``coupling_plan``), so tensor parallelism and later a fused kernel see it;
``model.tensor_product=cueq`` hands the same products to cuequivariance (``cueq.py``),
``oeq`` the edge product to OpenEquivariance (``oeq.py``). The written-out form replaced
one einsum per path, whose per-path slices of the radial weights each cost a zero fill of
the full [E, C, P] tensor in backward and again in double backward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from megagnn import ops
from megagnn.models import cueq, oeq
from megagnn.models.edges import Edges
from megagnn.models.o3 import path_couplings, paths, spherical_harmonics


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


@functools.lru_cache(maxsize=8)
def coupling_plan(lmax: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The paths of ``paths(lmax)`` regrouped by output degree l3, for one batched matmul per
    l3. The inputs of the paths into l3 are stacked into S_l3 rows (path p contributes the
    2 l1 + 1 rows of its feature degree); returns, over the rows of every l3 in turn,
    ``rows`` (the row of x each one reads, [ΣS]) and ``path`` (the path it belongs to,
    [ΣS]), and per l3 the coefficients ``cg [(L+1)², S_l3, 2l3+1]`` that turn the edge's
    harmonics into the [S_l3, 2l3+1] coupling of those rows (Clebsch-Gordan blocks placed
    at the path's harmonic degree, divided by sqrt(paths into l3)). fp64 on the host, also
    when the model is built on the meta device."""
    with torch.device("cpu"):
        return _coupling_plan(lmax)


def _coupling_plan(lmax: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    all_paths, couplings = paths(lmax), path_couplings(lmax)
    rows, path, cgs = [], [], []
    for l3 in range(lmax + 1):
        into = [(p, q) for p, q in enumerate(all_paths) if q[2] == l3]
        size = sum(2 * l1 + 1 for _, (l1, _, _) in into)
        cg = torch.zeros((lmax + 1) ** 2, size, 2 * l3 + 1, dtype=torch.float64)
        start = 0
        for p, (l1, l2, _) in into:
            stop = start + 2 * l1 + 1
            block = couplings[p].transpose(0, 1)  # [2l2+1, 2l1+1, 2l3+1]
            cg[l2 * l2 : (l2 + 1) ** 2, start:stop] = block
            rows += range(l1 * l1, (l1 + 1) ** 2)
            path += [p] * (2 * l1 + 1)
            start = stop
        cgs.append(cg)
    return torch.tensor(rows), torch.tensor(path), cgs


def couple(
    x: torch.Tensor,
    w: torch.Tensor,
    second: torch.Tensor,
    lmax: int,
    index: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Σ_p w_p ⊙ (x^{l1} ⊗ second^{l2})^{l3} per output degree l3, channel-wise, over the
    paths p of ``paths(lmax)``, for B items: features ``x [B, (L+1)², C]`` (or rows
    ``index [B]`` of a bigger x, gathered after the path rows are picked), path weights
    ``w [B, P, C]``, and ``second`` either [B, (L+1)²] (edge harmonics, the same for every
    channel) or [B, (L+1)², C]. Returns [B, 2l3+1, C] for l3 = 0..L."""
    rows, path, cgs = coupling_plan(lmax)
    rows, path = rows.to(x.device), path.to(x.device)
    z = x.index_select(1, rows)  # every path's input rows
    z = (z if index is None else z[index]) * w.index_select(1, path)  # [B, ΣS, C]
    out = []
    for l3, (cg, z_l3) in enumerate(zip(cgs, z.split([c.shape[1] for c in cgs], 1), strict=True)):
        cg = cg.to(device=x.device, dtype=x.dtype)
        size = cg.shape[1]
        if second.dim() == 2:  # one coupling [2l3+1, S] per item, a matmul with its rows
            coupling = (second @ cg.view(second.shape[1], -1)).view(-1, size, 2 * l3 + 1)
            if ops.fusable():  # one loop over items and channels, no [B, S, C] stored
                out.append((coupling.unsqueeze(-1) * z_l3.unsqueeze(2)).sum(1))
            else:
                out.append(torch.bmm(coupling.transpose(1, 2), z_l3))  # [B, 2l3+1, C]
        else:  # a coupling per channel
            coupling = torch.einsum("bkc,ksm->bsmc", second, cg)  # [B, S, 2l3+1, C]
            out.append(torch.einsum("bsmc,bsc->bmc", coupling, z_l3))
    return out


PRODUCT_HIDDEN = 16  # width of the MLP that gives A ⊗ A's path weights (about 6% of a block)


class IrrepBlock(nn.Module):
    def __init__(
        self,
        hidden: int,
        lmax: int,
        num_rbf: int,
        radial_hidden: int,
        correlation: int = 1,
        tensor_product: str = "auto",
    ):
        super().__init__()
        self.hidden, self.lmax, self.tensor_product = hidden, lmax, tensor_product
        self.paths = paths(lmax)
        coupling_plan(lmax)  # computed now, not inside an export trace
        if tensor_product != "e3nn" and cueq.installed():
            cueq.coefficients(lmax)
        self.up = DegreeLinear(lmax, hidden, hidden)
        # radial weights, channel-major (channel c, path p at c * P + p): a contiguous split
        # over tensor-parallel ranks keeps every path of a channel together
        self.radial = nn.Sequential(
            nn.Linear(num_rbf, radial_hidden),
            nn.SiLU(),
            nn.Linear(radial_hidden, len(self.paths) * hidden),
        )
        # correlation 2: weights of A ⊗ A's paths per atom, from a small MLP of its scalars
        # (MACE's depend on the element), channel-major like the radial weights
        self.product = None
        if correlation > 1:
            self.product = nn.Sequential(
                nn.Linear(hidden, PRODUCT_HIDDEN),
                nn.SiLU(),
                nn.Linear(PRODUCT_HIDDEN, len(self.paths) * hidden),
            )
        # out: scalars get C outputs plus one gate per channel of every degree l > 0
        self.out = DegreeLinear(lmax, hidden, hidden, scalar_out=(lmax + 1) * hidden)
        # tensor-parallel boundary: the product's weights are needed for every atom, from
        # scalars that a node-parallel region holds only for this rank's atoms
        self.gather_nodes = nn.Identity()

    def forward(self, state: tuple[torch.Tensor], edges: Edges) -> tuple[torch.Tensor]:
        (x,) = state  # [N, (L+1)², C]
        y = torch.cat(self.up(x), dim=1)  # [N, (L+1)², C/tp]

        def message(e: Edges) -> torch.Tensor:
            sh = spherical_harmonics(self.lmax, e.unit).to(x.dtype)  # [E, (L+1)²]
            w = self.radial(e.rbf) * e.envelope.unsqueeze(-1).to(x.dtype)
            # Σ_p (R_p(r_ij) ⊙ y_j^{l1} ⊗ Y^{l2}(r̂_ij))^{l3}, [E, (L+1)², C/tp]
            return e.aggregate(self.couple(y, self._path_major(w), sh, e.sender))

        agg = edges.map(message) * edges.inv_avg_neighbors  # A_i [N, (L+1)², C/tp]
        if self.product is not None:  # + Σ_p w_p(s_i) ⊙ (A_i^{l1} ⊗ A_i^{l2})^{l3}
            w = self._path_major(self.product(self.gather_nodes(x[:, 0, :])))  # [N, P, C/tp]
            agg = agg + self.couple(agg, w, agg)
        mixed = self.out(agg)  # scalars [N, 1, (L+1) C], degrees l > 0 [N, 2l+1, C]
        scalars, gates = mixed[0][..., : self.hidden], mixed[0][..., self.hidden :]
        update = [nn.functional.silu(scalars)]
        for l in range(1, self.lmax + 1):
            gate = torch.sigmoid(gates[..., (l - 1) * self.hidden : l * self.hidden])
            update.append(mixed[l] * gate)  # [N, 2l+1, C] x [N, 1, C]
        return (x + torch.cat(update, dim=1),)

    def couple(
        self, x: torch.Tensor, w: torch.Tensor, second: torch.Tensor, index=None
    ) -> torch.Tensor:
        """``couple``, by what model.tensor_product picks, as [B, (L+1)², C]."""
        choice = self.tensor_product
        if choice == "auto":
            choice = "cueq" if x.is_cuda and cueq.installed() and cueq.has_cuda_ops() else "e3nn"
        if choice == "cueq":
            return cueq.couple(x, w, second, self.lmax, index)
        if choice == "oeq" and second.dim() == 2:  # the edge product; A ⊗ A stays written out
            return oeq.couple(x, w, second, self.lmax, index)
        return torch.cat(couple(x, w, second, self.lmax, index), 1)

    def _path_major(self, w: torch.Tensor) -> torch.Tensor:
        """[B, C/tp · P] channel-major -> [B, P, C/tp], so path rows gather channel vectors."""
        return (
            w.view(-1, w.shape[1] // len(self.paths), len(self.paths)).transpose(1, 2).contiguous()
        )


class IrrepNet(nn.Module):
    """Embedding (scalars from Z, higher degrees zero) -> L blocks -> per-atom scalars
    [N, C]. Node state ``(x,)`` with x [N, (L+1)², C]; ``pack``/``unpack`` flatten it for
    pipeline stages. ``split_nodes``/``gather_nodes`` are where tensor parallelism may enter
    and leave a node-parallel region."""

    def __init__(
        self,
        hidden: int,
        layers: int,
        num_rbf: int,
        max_z: int,
        radial_hidden: int,
        lmax: int = 2,
        correlation: int = 1,
        tensor_product: str = "auto",
    ):
        super().__init__()
        self.hidden, self.lmax = hidden, lmax
        self.embedding = nn.Embedding(max_z + 1, hidden)
        self.blocks = nn.ModuleList(
            IrrepBlock(hidden, lmax, num_rbf, radial_hidden, correlation, tensor_product)
            for _ in range(layers)
        )
        self.split_nodes = nn.Identity()
        self.gather_nodes = nn.Identity()

    def embed(self, atomic_numbers: torch.Tensor) -> tuple[torch.Tensor]:
        s = self.embedding(atomic_numbers)  # [N, C]
        rest = s.new_zeros(s.shape[0], (self.lmax + 1) ** 2 - 1, s.shape[1])
        x = torch.cat([s.unsqueeze(1), rest], dim=1)  # [N, (L+1)², C]
        return (self.split_nodes(x),)  # [N(/tp), (L+1)², C]

    def scalars(self, state: tuple[torch.Tensor]) -> torch.Tensor:
        return self.gather_nodes(state[0][:, 0, :])  # [N, C]

    def pack(self, state: tuple[torch.Tensor]) -> torch.Tensor:
        return state[0].flatten(1)  # [N, (L+1)² C]

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.view(x.shape[0], (self.lmax + 1) ** 2, self.hidden),)
