"""IrrepNet's interaction against its specification: one plain einsum per path."""

import math

import torch

from megagnn.models.irrep import IrrepBlock, degree
from megagnn.models.o3 import clebsch_gordan, spherical_harmonics


class RandomEdges:
    """The fields of ``Edges`` an IrrepBlock reads, random, with unsorted senders, atoms
    without edges and one atom receiving every other edge."""

    def __init__(self, n_atoms: int, n_edges: int, num_rbf: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        vec = torch.randn(n_edges, 3, generator=g, dtype=torch.float64)
        self.unit = vec / vec.norm(dim=1, keepdim=True)
        self.rbf = torch.randn(n_edges, num_rbf, generator=g, dtype=torch.float64)
        self.envelope = torch.rand(n_edges, generator=g, dtype=torch.float64)
        self.sender = torch.randint(0, n_atoms, (n_edges,), generator=g)
        self.receiver = torch.randint(0, n_atoms - 2, (n_edges,), generator=g)
        self.receiver[::2] = 0
        self.n_atoms = n_atoms
        self.inv_avg_neighbors = 0.3

    def aggregate(self, messages: torch.Tensor) -> torch.Tensor:
        out = messages.new_zeros(self.n_atoms, *messages.shape[1:])
        return out.index_add(0, self.receiver, messages)

    def map(self, fn):
        return fn(self)


def reference_messages(block: IrrepBlock, x: torch.Tensor, edges: RandomEdges) -> torch.Tensor:
    """Σ_p R_p ⊙ (y_j^{l1} ⊗ Y^{l2})^{l3} / sqrt(paths into l3), every path one einsum."""
    sh = spherical_harmonics(block.lmax, edges.unit)
    c = block.hidden
    w = (block.radial(edges.rbf) * edges.envelope[:, None]).view(-1, c, len(block.paths))
    y = [lin(degree(x, l)) for l, lin in enumerate(block.up.linears)]
    out = [0.0] * (block.lmax + 1)
    for p, (l1, l2, l3) in enumerate(block.paths):
        ylm = sh[:, l2 * l2 : (l2 + 1) ** 2]
        term = torch.einsum("eac,eb,abk,ec->ekc", y[l1][edges.sender], ylm,
                            clebsch_gordan(l1, l2, l3), w[:, :, p])  # fmt: skip
        n_into = sum(q[2] == l3 for q in block.paths)
        out[l3] = out[l3] + term / math.sqrt(n_into)
    return edges.aggregate(torch.cat(out, dim=1)) * edges.inv_avg_neighbors


def test_block_matches_per_path_einsums():
    torch.manual_seed(0)
    block = IrrepBlock(hidden=8, lmax=2, num_rbf=6, radial_hidden=16).double()
    edges = RandomEdges(n_atoms=7, n_edges=40, num_rbf=6)
    x = torch.randn(7, 9, 8, dtype=torch.float64)
    captured = {}
    block.out.register_forward_pre_hook(lambda _, args: captured.update(agg=args[0]))
    block((x,), edges)
    expected = reference_messages(block, x, edges)
    torch.testing.assert_close(captured["agg"], expected, rtol=1e-12, atol=1e-12)
    assert expected[-2:].abs().max() == 0  # atoms without edges receive nothing


def test_product_matches_per_path_einsums():
    """correlation=2 adds Σ_p w_p(s_i) ⊙ (A_i^{l1} ⊗ A_i^{l2})^{l3} / sqrt(paths into l3) to
    the neighbour sum A_i, channel by channel."""
    torch.manual_seed(1)
    block = IrrepBlock(hidden=8, lmax=2, num_rbf=6, radial_hidden=16, correlation=2).double()
    edges = RandomEdges(n_atoms=7, n_edges=40, num_rbf=6, seed=1)
    x = torch.randn(7, 9, 8, dtype=torch.float64)
    captured = {}
    block.out.register_forward_pre_hook(lambda _, args: captured.update(b=args[0]))
    block((x,), edges)
    a = reference_messages(block, x, edges)
    w = block.product(x[:, 0, :]).view(7, 8, len(block.paths))
    out = [0.0] * (block.lmax + 1)
    for p, (l1, l2, l3) in enumerate(block.paths):
        term = torch.einsum("nac,nbc,abk,nc->nkc", degree(a, l1), degree(a, l2),
                            clebsch_gordan(l1, l2, l3), w[:, :, p])  # fmt: skip
        out[l3] = out[l3] + term / math.sqrt(sum(q[2] == l3 for q in block.paths))
    torch.testing.assert_close(captured["b"], a + torch.cat(out, dim=1), rtol=1e-12, atol=1e-12)
