"""The inference package: a trained model compiled ahead of time (AOTInductor ``.pt2``).

One call maps a structure of any size to energy, forces and stress:

    inputs   positions [N, 3] f64 Å, atomic_numbers [N] i64, cell [3, 3] f64 Å (rows),
             pbc [3] bool, edge_index [2, E] i64 (sender j, receiver i; sorted by receiver),
             cell_shifts [E, 3] f64 (r_ij = x_j - x_i + S_ij @ cell), head [] i64
    outputs  energy [] eV, forces [N, 3] eV/Å, stress [3, 3] eV/Å^3 (zeros unless the cell is
             periodic in all three directions and the model predicts stress)

Conservative forces are a gradient: the model's forward, ``autograd.grad`` included, is
first traced by ``make_fx`` into one graph of plain tensor ops (the backward written out),
with atoms and edges as symbolic sizes and the weights as constants; that graph is exported
with ``torch.export`` and compiled by AOTInductor. The package's metadata (cutoff, heads,
units, version, ...) is readable from Python (``load_package``) and C++
(``AOTIModelPackageLoader::get_metadata``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

import megagnn
from megagnn import keys as K
from megagnn import ops
from megagnn.config import config_to_dict
from megagnn.models import Potential

INPUTS = ("positions", "atomic_numbers", "cell", "pbc", "edge_index", "cell_shifts", "head")


class _Serve(nn.Module):
    """One structure in, (energy, forces, stress) out: the package's calling convention."""

    def __init__(self, model: Potential):
        super().__init__()
        self.model = model

    def forward(self, positions, atomic_numbers, cell, pbc, edge_index, cell_shifts, head):
        n = positions.shape[0]
        batch = {
            K.POSITIONS: positions,
            K.ATOMIC_NUMBERS: atomic_numbers,
            K.CELL: cell.unsqueeze(0),
            K.PBC: pbc.unsqueeze(0),
            K.EDGE_INDEX: edge_index,
            K.CELL_SHIFTS: cell_shifts,
            K.BATCH: torch.zeros(n, dtype=torch.long, device=positions.device),
            K.HEAD: head.reshape(1),
        }
        stress = self.model.cfg.stress and self.model.cfg.forces == "conservative"
        out = self.model(batch, compute_forces=True, compute_stress=stress)
        zero_stress = torch.zeros_like(cell)
        return out[K.ENERGY][0], out[K.FORCES], out[K.STRESS][0] if stress else zero_stress


def example_inputs(model: Potential, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A periodic fcc cell with 12 neighbours per atom inside the cutoff: sizes of 0 or 1
    would be specialised by tracing, so the example has many atoms and edges."""
    from ase.build import bulk

    from megagnn.data.graph import atoms_to_graph, to_device

    cutoff = model.cfg.cutoff
    atoms = bulk("Cu", "fcc", a=0.8 * cutoff * math.sqrt(2), cubic=True) * 2
    atoms.rattle(0.01 * cutoff, seed=0)
    atoms.numbers[:] = 1
    g = to_device(atoms_to_graph(atoms, cutoff), "cpu", dtype)
    return graph_inputs(g)


def graph_inputs(g: dict[str, torch.Tensor], head: int = 0) -> tuple[torch.Tensor, ...]:
    """The package's inputs from a one-structure batch (``megagnn.data.atoms_to_graph``)."""
    return (
        g[K.POSITIONS],
        g[K.ATOMIC_NUMBERS],
        g[K.CELL][0],
        g[K.PBC][0],
        g[K.EDGE_INDEX],
        g[K.CELL_SHIFTS],
        torch.tensor(head, dtype=torch.long),
    )


def metadata(model: Potential, dtype: torch.dtype) -> dict[str, str]:
    cfg = model.cfg
    elements = sorted(
        int(z) for z in (model.atomic_energies != 0).any(dim=0).nonzero().flatten().tolist()
    )
    return {
        "megagnn_version": megagnn.__version__,
        "format": "megagnn-aoti-1",
        "inputs": ",".join(INPUTS),
        "cutoff": repr(float(cfg.cutoff)),
        "dtype": str(dtype).removeprefix("torch."),
        "heads": ",".join(cfg.heads),
        "forces": cfg.forces,
        "stress": str(bool(cfg.stress and cfg.forces == "conservative")).lower(),
        "elements": ",".join(map(str, elements)),
        "max_z": str(cfg.max_z),
        "units": "energy eV, length Å, forces eV/Å, stress eV/Å^3",
        "model_config": json.dumps(config_to_dict(cfg)),
    }


def export_package(model: Potential, path: str | Path, dtype: torch.dtype = torch.float64) -> Path:
    """Compile ``model`` (one process, any weights) into an AOTInductor package at ``path``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an inference package is a .pt2 file, not {path.name}")
    model = model.to("cpu", dtype).eval()
    serve = _Serve(model)
    example = example_inputs(model, dtype)
    # the weights enter the trace as constants: as inputs they would get symbolic sizes too,
    # and a weight dimension equal to the example's atom count would be unified with it
    flags = [p.requires_grad for p in serve.parameters()]
    for p in serve.parameters():
        p.requires_grad_(False)
    try:
        # the package is a portable graph of torch ops: the PyTorch references, not kernels
        with ops.use_backend("torch"):
            graph = make_fx(serve, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    finally:
        for p, flag in zip(serve.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    atoms, edges = torch.export.Dim("atoms", min=1), torch.export.Dim("edges", min=0)
    shapes = ({0: atoms}, {0: atoms}, None, None, {1: edges}, {0: edges}, None)
    program = torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.pt2")
    configs = {
        "aot_inductor.metadata": metadata(model, dtype),
        # inductor's vectorised C++ code generation fails on the scatter-add of messages
        "cpp.simdlen": 1,
    }
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp), inductor_configs=configs
    )
    tmp.replace(path)  # a package that exists is a complete one
    return path


class Package:
    """A loaded inference package: ``package(*inputs)`` -> (energy, forces, stress)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no inference package at {path}")
        # the loader warns when the package was compiled without vector instructions
        quiet = logging.getLogger("torch.export.pt2_archive._package")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        finally:
            quiet.setLevel(level)
        self.metadata = dict(self.runner.get_metadata())
        if self.metadata.get("format") != "megagnn-aoti-1":
            raise ValueError(f"{path} is not a megagnn inference package")
        self.cutoff = float(self.metadata["cutoff"])
        self.dtype = getattr(torch, self.metadata["dtype"])
        self.has_stress = self.metadata["stress"] == "true"

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.runner(*inputs))


def load_package(path: str | Path) -> Package:
    return Package(path)
