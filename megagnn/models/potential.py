"""Interatomic potential: geometry -> backbone -> energy heads -> forces and stress."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megagnn import keys as K
from megagnn.config import ModelConfig
from megagnn.models.edges import ChunkedEdges, Edges, chunk_bounds, sort_by_receiver
from megagnn.models.egnn import EGNN
from megagnn.models.irrep import IrrepNet
from megagnn.models.painn import PaiNN
from megagnn.models.radial import make_basis
from megagnn.models.schnet import SchNet
from megagnn.ops import radial_basis, segment_sum

BACKBONES = {"schnet": SchNet, "painn": PaiNN, "egnn": EGNN, "irrep": IrrepNet}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    args = (cfg.hidden, cfg.layers, cfg.num_rbf, cfg.max_z, cfg.radial_hidden)
    if cfg.family == "irrep":
        return IrrepNet(
            *args, lmax=cfg.lmax, correlation=cfg.correlation, tensor_product=cfg.tensor_product
        )
    return BACKBONES[cfg.family](*args)


class EnergyHead(nn.Module):
    """Per-atom energy readout, one MLP per dataset family on the shared trunk."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        mid = max(hidden // 2, 1)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, mid), nn.SiLU(), nn.Linear(mid, 1))
            for _ in range(num_heads)
        )

    def forward(self, h: torch.Tensor, head_of_atom: torch.Tensor) -> torch.Tensor:  # -> [N]
        if len(self.mlps) == 1:
            return self.mlps[0](h).squeeze(-1)
        out = torch.stack([mlp(h).squeeze(-1) for mlp in self.mlps], dim=-1)  # [N, heads]
        return out.gather(1, head_of_atom.unsqueeze(-1)).squeeze(-1)


class DirectForceHead(nn.Module):
    """F_i = Σ_j w_ij r̂_ij with w_ij = w_ji from a symmetric edge MLP (Newton's third law)."""

    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        self.node = nn.Linear(hidden, hidden)
        self.radial = nn.Linear(num_rbf, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor, edges: Edges) -> torch.Tensor:  # -> [N, 3]
        x = self.node(h)  # [N, H/tp]

        def force(e: Edges) -> torch.Tensor:
            w = self.out(x[e.sender] * x[e.receiver] * self.radial(e.rbf)).squeeze(-1)  # [E]
            f = (w * e.envelope).unsqueeze(-1).to(e.unit.dtype) * e.unit  # [E, 3]
            return e.aggregate(f)

        return edges.map(force) * edges.inv_avg_neighbors


class Potential(nn.Module):
    """E = Σ_i [scale · y_i + E_ref(Z_i)];  F = -∂E/∂x;  σ = (1/V) ∂E/∂ε.

    ``scale``, ``atomic_energies`` and ``avg_num_neighbors`` are buffers set from dataset
    statistics (``set_statistics``) and saved with the weights.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.basis = make_basis(cfg.rbf, cfg.cutoff, cfg.num_rbf)
        self.energy_head = EnergyHead(cfg.hidden, len(cfg.heads))
        self.force_head = (
            DirectForceHead(cfg.hidden, cfg.num_rbf) if cfg.forces == "direct" else None
        )
        # tensor-parallel boundary: replicated edge geometry that multiplies channel-split
        # activations inside the backbone (its gradient must be summed over the channels)
        self.geometry_to_channels = nn.Identity()
        self.register_buffer("scale", torch.ones(len(cfg.heads)))
        # fp64 whatever the model's dtype (see _apply): a molecule's reference energy is
        # ~1e4 eV, where fp32's spacing (~1 meV) is the accuracy QM9-style benchmarks compare
        self.register_buffer(
            "atomic_energies", torch.zeros(len(cfg.heads), cfg.max_z + 1, dtype=torch.float64)
        )
        # the elements each head's training split held (set with the statistics)
        self.register_buffer(
            "trained_elements", torch.zeros(len(cfg.heads), cfg.max_z + 1, dtype=torch.bool)
        )
        self.register_buffer("avg_num_neighbors", torch.ones(()))
        self.reset_buffers()
        self.recompute_activations = False
        # whether forward computes forces and stress unless told: a trainer whose data holds
        # no force (stress) labels turns them off, so energy-only data trains on energies
        # alone (the config, and so every saved model, still predicts them)
        self.labels_forces = self.labels_stress = True
        # node-parallel regions split the atoms evenly over the tensor-parallel ranks: the
        # blocks see N padded to a multiple of this (padding atoms have no edges)
        self.node_multiple = 1
        # evaluate a graph of more edges than this chunk by chunk, recomputing each chunk's
        # per-edge tensors in backward (ChunkedEdges): for structures of 10^5-10^6 atoms
        self.edge_chunk: int | None = None

    def _apply(self, fn, recurse=True):
        # .to(dtype) and .half() cast every floating buffer: the reference energies keep fp64
        # (they may still move between devices)
        before = self._buffers["atomic_energies"]
        super()._apply(fn, recurse)
        after = self._buffers["atomic_energies"]
        if after is not None and before is not None and after.dtype != before.dtype:
            self._buffers["atomic_energies"] = (
                after.to(before.dtype) if after.is_meta else (before.to(after.device))
            )
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Statistics before ``set_statistics``: unit scale, no reference energies."""
        self.scale.fill_(1.0)
        self.atomic_energies.zero_()
        self.trained_elements.zero_()
        self.avg_num_neighbors.fill_(1.0)

    @torch.no_grad()
    def set_statistics(
        self,
        head: int,
        atomic_energies: dict[int, float],
        scale: float,
        avg_neighbors: float,
        elements: list[int] | None = None,
    ) -> None:
        """``elements``: those the head trains on (default: those with a reference energy;
        an element seen only in records without energies has none)."""
        self.atomic_energies[head].zero_()
        self.trained_elements[head].zero_()
        for z, e in atomic_energies.items():
            self.atomic_energies[head, int(z)] = e
        for z in atomic_energies if elements is None else elements:
            self.trained_elements[head, int(z)] = True
        self.scale[head] = scale
        self.avg_num_neighbors.fill_(avg_neighbors)

    def elements(self, head: int = 0) -> set[int] | None:
        """Atomic numbers ``head`` was trained on; None before any statistics were set (an
        untrained model knows no elements to check against)."""
        known = self.trained_elements[head].nonzero().flatten().tolist()
        return set(known) or None

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        compute_forces: bool | None = None,
        compute_stress: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict energy [B], forces [N, 3] and stress [B, 3, 3] for a batch.

        Forces and stress default to what the config asks for (and ``labels_forces`` /
        ``labels_stress`` allow). With conservative forces the graph is kept (create_graph)
        while training, so force losses can be backpropagated.
        """
        compute_forces, compute_stress = self.outputs(compute_forces, compute_stress)
        conservative = compute_forces and self.cfg.forces == "conservative"
        # forces are gradients: they need autograd even when called under no_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() or conservative):
            return self._forward(batch, compute_forces, compute_stress, conservative)

    def outputs(
        self, compute_forces: bool | None = None, compute_stress: bool | None = None
    ) -> tuple[bool, bool]:
        """(forces, stress) to predict: as given, else what the config asks for and
        ``labels_forces`` / ``labels_stress`` allow (stress needs conservative forces)."""
        cfg = self.cfg
        if compute_forces is None:
            compute_forces = cfg.forces != "none" and self.labels_forces
        if compute_stress is None:
            conservative = compute_forces and cfg.forces == "conservative"
            compute_stress = cfg.stress and conservative and self.labels_stress
        return compute_forces, compute_stress

    def _forward(self, batch, compute_forces, compute_stress, conservative):
        pos = batch[K.POSITIONS].detach().requires_grad_(conservative)  # [N, 3]
        # homogeneous strain ε applied to positions and cell: dE/dε gives the virial
        strain = torch.zeros_like(batch[K.CELL]).requires_grad_(True) if compute_stress else None
        out = self.energy_terms(batch, pos, strain, compute_forces, conservative)
        if conservative:
            inputs = [pos] if strain is None else [pos, strain]
            grads = torch.autograd.grad(
                out[K.ENERGY].sum(), inputs, create_graph=self.training, allow_unused=True
            )
            out[K.FORCES] = -_zero_if_none(grads[0], inputs[0])
            if strain is not None:
                out[K.STRESS] = stress_from_virial(_zero_if_none(grads[1], strain), batch)
        return out

    def energy_terms(
        self,
        batch: dict[str, torch.Tensor],
        pos: torch.Tensor,
        strain: torch.Tensor | None,
        direct_forces: bool,
        differentiated: bool,
    ) -> dict[str, torch.Tensor]:
        """Energy [B] and per-atom energies [N] at positions ``pos`` [N, 3] under the
        homogeneous ``strain`` [B, 3, 3] (None: unstrained), and direct forces if asked and
        the model has a force head: everything but the derivatives, which the caller takes
        (``differentiated``: it will, so training differentiates the messages twice)."""
        cell = batch[K.CELL]  # [B, 3, 3]
        if strain is not None:
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("ni,nij->nj", pos, sym[batch[K.BATCH]])
            cell = cell + torch.bmm(cell, sym)
        edges, raw = self.edges(batch, pos, cell, twice=differentiated and self.training)
        state = self.embed(batch[K.ATOMIC_NUMBERS])
        state = self.run_blocks(self.backbone.blocks, state, edges)
        return self.heads(self.backbone.scalars(state), batch, raw if direct_forces else None)

    def edges(
        self,
        batch: dict[str, torch.Tensor],
        pos: torch.Tensor,
        cell: torch.Tensor,
        twice: bool = False,
    ) -> tuple[Edges | ChunkedEdges, Edges | ChunkedEdges]:
        """Edge geometry in full precision, as the blocks see it (behind the tensor-parallel
        boundary) and raw (for the direct force head, which works on replicated values);
        ``twice``: the loss will differentiate the messages twice (see Edges). With
        ``edge_chunk`` set and more edges than that, ``ChunkedEdges`` that compute the
        geometry chunk by chunk when the blocks map over them."""
        index, shifts = batch[K.EDGE_INDEX], batch[K.CELL_SHIFTS]
        num_nodes = self.padded(pos.shape[0])
        chunk = self.edge_chunk
        if chunk is not None and index.shape[1] > chunk and not torch.compiler.is_compiling():
            if bool((index[1, 1:] < index[1, :-1]).any()):  # no copies of edges in order
                index, shifts = sort_by_receiver(index, shifts)
            bounds = chunk_bounds(index[1], num_nodes, chunk)

            def geometry(e0: int, e1: int, n0: int, n1: int, raw: bool) -> Edges:
                edges = self._geometry(batch, pos, cell, index[:, e0:e1], shifts[e0:e1], twice)
                edges = replace(edges, num_nodes=n1 - n0, offset=n0)
                return edges if raw else self._to_channels(edges)

            return tuple(  # type: ignore[return-value]
                ChunkedEdges(
                    functools.partial(geometry, raw=raw),
                    bounds,
                    1.0 / self.avg_num_neighbors,
                    num_nodes,
                )
                for raw in (False, True)
            )
        # the kernels need receiver-sorted edges: established here, whatever made the batch
        index, shifts = sort_by_receiver(index, shifts)
        raw = self._geometry(batch, pos, cell, index, shifts, twice)
        return replace(self._to_channels(raw), num_nodes=num_nodes), raw

    def _geometry(self, batch, pos, cell, index, shifts, twice: bool) -> Edges:
        """The ``Edges`` of receiver-sorted ``index [2, E]`` with ``shifts [E, 3]``."""
        sender, receiver = index
        edge_graph = batch[K.BATCH][receiver]
        # (a meta-device forward, which counts FLOPs of any size, has no autocast)
        full = torch.autocast(pos.device.type, enabled=False) if not pos.is_meta else nullcontext()
        with full:
            shift = torch.einsum("ei,eij->ej", shifts, cell[edge_graph])  # [E, 3]
            vec = pos[sender] - pos[receiver] + shift  # [E, 3]
            r = torch.linalg.vector_norm(vec, dim=-1)  # [E]
            unit = vec / r.unsqueeze(-1)  # [E, 3]
            # [E, K], [E]: one fused pass over the edges on GPUs
            rbf, env = radial_basis(vec, r, self.basis, self.cfg.cutoff, self.cfg.envelope_p)
        inv = 1.0 / self.avg_num_neighbors
        return Edges(index, rbf, env, unit, inv, pos.shape[0], True, differentiated_twice=twice)

    def _to_channels(self, edges: Edges) -> Edges:
        """The edges as the blocks see them: behind the tensor-parallel boundary."""
        to_channels = self.geometry_to_channels
        return replace(edges, envelope=to_channels(edges.envelope), unit=to_channels(edges.unit))

    def padded(self, num_atoms: int) -> int:
        """Number of nodes the blocks hold: atoms padded to ``node_multiple``."""
        return -(-num_atoms // self.node_multiple) * self.node_multiple

    def embed(self, atomic_numbers: torch.Tensor) -> tuple:
        """Initial node state of the atoms (padded with Z = 0 nodes that have no edges)."""
        pad = self.padded(atomic_numbers.shape[0]) - atomic_numbers.shape[0]
        if pad:
            atomic_numbers = torch.nn.functional.pad(atomic_numbers, (0, pad))
        return self.backbone.embed(atomic_numbers)

    def run_blocks(self, blocks: nn.ModuleList, state: tuple, edges: Edges) -> tuple:
        """Apply ``blocks`` in order; with ``recompute_activations`` each block keeps only its
        input and recomputes the rest in backward (works for force losses: second derivatives
        pass through the non-reentrant checkpoint)."""
        # chunked edges (a structure too large to store per-edge tensors) also recompute
        # whole blocks: then backward holds one block's node activations, not all of them
        chunked = isinstance(edges, ChunkedEdges)
        for block in blocks:
            recompute = self.recompute_activations and self.training or chunked
            if recompute and torch.is_grad_enabled():
                state = checkpoint(block, state, edges, use_reentrant=False)
            else:
                state = block(state, edges)
        return state

    def heads(
        self, h: torch.Tensor, batch: dict[str, torch.Tensor], raw_edges: Edges | None
    ) -> dict[str, torch.Tensor]:
        """Energy [B] (fp64: the model's part in its dtype, the reference energies added in
        fp64) from per-atom features h [N, H]; direct forces [N, 3] if ``raw_edges`` is given
        and the model has a force head."""
        graph_of_atom = batch[K.BATCH]
        head = batch[K.HEAD][graph_of_atom]  # [N]
        h = h[: graph_of_atom.shape[0]]  # without padding nodes
        y = self.energy_head(h, head)  # [N]
        dtype = batch[K.POSITIONS].dtype  # out of bf16 before summing
        reference = self.atomic_energies[head, batch[K.ATOMIC_NUMBERS]]  # [N]
        learned = y.to(dtype) * self.scale[head]  # [N]
        atomic = learned.to(torch.float64) + reference  # [N] fp64
        out = {K.ENERGY: segment_sum(atomic, graph_of_atom, batch[K.CELL].shape[0])}
        out[K.ENERGIES] = atomic.to(dtype)
        if raw_edges is not None and self.force_head is not None:
            out[K.FORCES] = self.force_head(h, raw_edges)
        return out


def stress_from_virial(virial: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stress [B, 3, 3] = (1/V) dE/dε, zero for structures not periodic in all directions."""
    c = batch[K.CELL]  # (a x b) . c: no LAPACK call, exports to any backend
    volume = (torch.linalg.cross(c[:, 0], c[:, 1]) * c[:, 2]).sum(-1).abs()  # [B]
    periodic = batch[K.PBC].all(dim=1) & (volume > 1e-8)
    stress = virial / torch.where(periodic, volume, 1.0)[:, None, None]
    return stress * periodic[:, None, None]


def _zero_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g
