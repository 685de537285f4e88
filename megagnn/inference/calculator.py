"""ASE calculator backed by a trained megagnn model: a checkpoint, a consolidated checkpoint
or an inference package (``.pt2``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from megagnn import keys as K
from megagnn.checkpoint import open_saved
from megagnn.data.graph import (
    atoms_to_graph,
    atoms_to_record,
    collate,
    structure_to_graph,
    to_device,
)
from megagnn.elements import check_elements
from megagnn.inference.package import Package, graph_inputs
from megagnn.models import Potential
from megagnn.parallel.state import ParallelState


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    parallel: ParallelState | None = None,
    node_parallel: bool = True,
) -> Potential:
    """The whole model, in eval mode, from a run folder (its latest checkpoint), a
    checkpoint folder saved under any tensor/pipeline layout (its averaged weights where it
    has them, optim.ema_decay) or a consolidated folder (``tools/convert_checkpoint.py
    consolidate``). With ``parallel`` (``init_parallel`` under torchrun, parallel.tensor > 1):
    this rank's tensor-parallel slices, atoms split between blocks where ``node_parallel``."""
    return open_saved(path).model(device, dtype, parallel, node_parallel)


EDGE_CHUNK = 2**16
"""Edges per chunk above which the calculator evaluates a structure chunk by chunk (about
1,500 atoms of a dense metal at 5 Å): each chunk's messages take ~10 KB an edge in backward
for a 100k-parameter PaiNN in fp32, and smaller chunks also stay in cache (faster than one
piece on CPU)."""

COINCIDENT = 1e-4
"""Atoms closer than this (Å) are refused: at zero distance the energy is undefined (NaN)."""


def check_positions(atoms: Atoms) -> None:
    """Refuse non-finite coordinates, naming the atom (before any neighbour list)."""
    positions = atoms.get_positions()
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad):
        raise ValueError(f"atom {int(bad[0])} has a non-finite position {positions[bad[0]]}")


def check_geometry(graph: dict[str, torch.Tensor]) -> None:
    """Refuse a one-structure graph whose atoms sit on top of each other (or of a periodic
    image of themselves), naming them; read off the edges the model is given anyway."""
    sender, receiver = graph[K.EDGE_INDEX]
    positions, cell = graph[K.POSITIONS], graph[K.CELL][0]
    step = 2**20  # edges at a time: O(1) memory for structures of millions of edges
    for start in range(0, sender.shape[0], step):
        s, r = sender[start : start + step], receiver[start : start + step]
        vec = positions[s] - positions[r] + graph[K.CELL_SHIFTS][start : start + step] @ cell
        close = torch.nonzero(torch.linalg.vector_norm(vec, dim=1) < COINCIDENT).flatten()
        if len(close):
            e = int(close[0])
            i, j = int(r[e]), int(s[e])
            d = float(torch.linalg.vector_norm(vec[e]))
            what = f"atom {i} and its periodic image" if i == j else f"atoms {i} and {j}"
            raise ValueError(
                f"{what} coincide ({d:.2g} Å apart, under {COINCIDENT} Å): the energy is "
                "undefined there"
            )


class MegaGNNCalculator(Calculator):
    """Energy, forces and (for periodic cells) stress from a megagnn model.

    Structures with elements the model was not trained on are refused
    (``megagnn.elements.UnknownElementError``) unless ``allow_unknown_elements``.

    ``model``: a Potential, a run/checkpoint/consolidated folder, or an inference package
    (``.pt2``, run in the dtype and on the device it was compiled for). Checkpoints run in
    fp64 on ``device`` by default: MD energy conservation needs more than fp32 gives.

    ``edge_chunk``: a structure with more edges than this is evaluated in chunks of this
    many edges, each recomputed in backward (``ChunkedEdges``), so that memory grows with
    the atoms and one chunk rather than with every block's per-edge messages; None
    evaluates every structure in one piece. Not for packages, whose graph is fixed.

    ``parallel``: evaluate each structure across a tensor-parallel group under torchrun
    (``megagnn.parallel.state.init_parallel`` with parallel.tensor = the group's size):
    every rank of the group holds 1/tp of the weights and, with ``node_parallel``, of the
    per-atom activations, and all of them must be asked for the same structure at the same
    time (each gets the whole result), as ranks running the same MD are.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: str | Path | Potential,
        head: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        allow_unknown_elements: bool = False,
        edge_chunk: int | None = EDGE_CHUNK,
        parallel: ParallelState | None = None,
        node_parallel: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.allow_unknown_elements = allow_unknown_elements
        self.device, self.dtype, self.head = torch.device(device), dtype, head
        self.package = None
        if isinstance(model, Potential):
            self.model = model
        elif str(model).endswith(".pt2"):
            self.package = Package(model)
            self.dtype, self.device = self.package.dtype, self.package.device
        else:
            self.model = load_model(model, device, dtype, parallel, node_parallel)
        if self.package is None:
            self.model.edge_chunk = edge_chunk
        self.cutoff = self.package.cutoff if self.package else self.model.cfg.cutoff
        self.elements = self.package.elements if self.package else self.model.elements(head)

    def check(self, atoms: Atoms) -> None:
        """Refuse elements the model was not trained on (UnknownElementError) unless
        ``allow_unknown_elements``, and non-finite positions (ValueError; coincident atoms
        are refused from the graph, ``check_geometry``)."""
        check_elements(atoms.numbers, self.elements, "this model", self.allow_unknown_elements)
        check_positions(atoms)

    def calculate(
        self, atoms: Atoms | None = None, properties=None, system_changes=all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        self.check(self.atoms)
        graph = atoms_to_graph(self.atoms, self.cutoff)
        check_geometry(graph)
        batch = to_device(graph, self.device, self.dtype)
        del graph  # its fp64 edge shifts: 24 bytes an edge, 1 GB for a million atoms
        batch[K.HEAD][:] = self.head
        periodic = bool(self.atoms.pbc.all())
        if self.package is not None:
            energy, forces, stress, *energies = self.package(*graph_inputs(batch, self.head))
            stress = stress if periodic and self.package.has_stress else None
            self._store(float(energy), forces, stress, energies[0] if energies else None)
            return
        out = self.model(batch, compute_stress=periodic and self.model.cfg.stress)
        stress = out.get(K.STRESS, [None])[0]
        self._store(float(out[K.ENERGY][0].detach()), out.get(K.FORCES), stress, out[K.ENERGIES])

    def predict(self, structures: list[Atoms], max_atoms: int = 4096) -> list[dict]:
        """Energy, forces and (periodic cells) stress of many structures, evaluated in
        batches of at most ``max_atoms`` atoms (a larger structure goes alone): for
        screening, where one structure per call leaves a GPU idle. A package, compiled for
        one structure, evaluates them one by one. Returns one dict per structure, in order,
        with ``energy`` (eV), ``energies`` [n] (per atom, eV), ``forces`` [n, 3] (eV/Å) and
        ``stress`` (Voigt, eV/Å^3, or None)."""
        if self.package is not None:
            keys = ("energy", "energies", "forces", "stress")
            out = []
            for atoms in structures:
                self.calculate(atoms.copy(), ["energy", "forces"], all_changes)
                out.append({k: self.results.get(k) for k in keys})
            return out
        for atoms in structures:
            self.check(atoms)
        results, group, size = [], [], 0
        for atoms in [*structures, None]:
            if group and (atoms is None or size + len(atoms) > max_atoms):
                results += self._predict_batch(group)
                group, size = [], 0
            if atoms is not None:
                group.append(atoms)
                size += len(atoms)
        return results

    def _predict_batch(self, structures: list[Atoms]) -> list[dict]:
        graphs = [structure_to_graph(atoms_to_record(a), self.cutoff) for a in structures]
        for graph in graphs:
            check_geometry(graph)
        batch = to_device(collate(graphs), self.device, self.dtype)
        batch[K.HEAD][:] = self.head
        out = self.model(batch, compute_stress=self.model.cfg.stress)
        forces = out.get(K.FORCES)
        if forces is not None:
            forces = forces.detach().cpu().double().split(batch[K.N_ATOMS].tolist())
        stress = out.get(K.STRESS)
        energies = out[K.ENERGIES].detach().cpu().double().split(batch[K.N_ATOMS].tolist())
        results = []
        for i, atoms in enumerate(structures):
            s = stress[i].detach().cpu().double().numpy() if stress is not None else None
            results.append(
                {
                    "energy": float(out[K.ENERGY][i].detach()),
                    "energies": energies[i].numpy(),
                    "forces": None if forces is None else forces[i].numpy(),
                    "stress": full_3x3_to_voigt_6_stress(s)
                    if s is not None and atoms.pbc.all()
                    else None,
                }
            )
        return results

    def _store(self, energy: float, forces, stress, energies=None) -> None:
        self.results = {"energy": energy, "free_energy": energy}
        if energies is not None:  # atoms.get_potential_energies()
            self.results["energies"] = energies.detach().cpu().numpy().astype(np.float64)
        if forces is not None:
            self.results["forces"] = forces.detach().cpu().numpy().astype(np.float64)
        if stress is not None:
            stress = stress.detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
