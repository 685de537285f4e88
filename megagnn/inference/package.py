"""The inference package: a trained model compiled ahead of time (AOTInductor ``.pt2``).

One call maps a structure of any size to energy, forces and stress:

    inputs   positions [N, 3] f64 Å, atomic_numbers [N] i64, cell [3, 3] f64 Å (rows),
             pbc [3] bool, edge_index [2, E] i64 (sender j, receiver i; sorted by receiver),
             cell_shifts [E, 3] f64 (r_ij = x_j - x_i + S_ij @ cell), head [] i64
    outputs  energy [] eV, forces [N, 3] eV/Å, stress [3, 3] eV/Å^3 (zeros unless the cell is
             periodic in all three directions and the model predicts stress), energies [N] eV
             (per atom, summing to energy; packages before 2026-12 end at stress)

Conservative forces are a gradient: the function compiled training traces
(``megagnn.models.compiled.Outputs``: the energy and its derivatives by ``torch.func.grad``)
is traced by ``make_fx`` into one graph of plain tensor ops (the backward written out), with
atoms and edges as symbolic sizes and the weights as constants; that graph is exported with
``torch.export`` and compiled by AOTInductor. The package's metadata (cutoff, heads,
units, version, ...) is readable from Python (``load_package``) and C++
(``AOTIModelPackageLoader::get_metadata``).
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path

import torch
from torch import nn

import megagnn
from megagnn import keys as K
from megagnn import ops
from megagnn.config import config_from_dict, config_to_dict
from megagnn.models import Potential
from megagnn.models.compiled import Outputs, clean_inductor_cache

INPUTS = ("positions", "atomic_numbers", "cell", "pbc", "edge_index", "cell_shifts", "head")


class PackageError(ValueError):
    """An inference package is corrupt, truncated or not megagnn's; names the file."""


class _Serve(nn.Module):
    """One structure in, (energy, forces, stress, energies) out: the package's calling
    convention."""

    def __init__(self, model: Potential):
        super().__init__()
        stress = model.cfg.stress and model.cfg.forces == "conservative"
        self.outputs = Outputs(model, forces=True, stress=stress)

    def forward(self, positions, atomic_numbers, cell, pbc, edge_index, cell_shifts, head):
        graph_of_atom = torch.zeros_like(atomic_numbers)  # one structure
        energy, forces, stress, energies = self.outputs(
            *(positions, atomic_numbers, cell.unsqueeze(0), pbc.unsqueeze(0)),
            *(edge_index, cell_shifts, graph_of_atom, head.reshape(1)),
        )
        return energy[0], forces, stress[0], energies


def example_inputs(
    model: Potential, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, ...]:
    """A periodic fcc cell with 12 neighbours per atom inside the cutoff: sizes of 0 or 1
    would be specialised by tracing, so the example has many atoms and edges."""
    from ase.build import bulk

    from megagnn.data.graph import atoms_to_graph, to_device

    cutoff = model.cfg.cutoff
    atoms = bulk("Cu", "fcc", a=0.8 * cutoff * math.sqrt(2), cubic=True) * 2
    atoms.rattle(0.01 * cutoff, seed=0)
    atoms.numbers[:] = 1
    g = to_device(atoms_to_graph(atoms, cutoff), device, dtype)
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
        torch.tensor(head, dtype=torch.long, device=g[K.POSITIONS].device),
    )


def metadata(
    model: Potential, dtype: torch.dtype, device: str = "cpu", run_config: dict | None = None
) -> dict[str, str]:
    cfg = model.cfg
    elements = sorted(int(z) for z in model.trained_elements.any(dim=0).nonzero().flatten())
    references = [
        {int(z): float(model.atomic_energies[h, z]) for z in model.elements(h) or ()}
        for h in range(len(cfg.heads))
    ]
    extra = {"run_config": json.dumps(run_config)} if run_config is not None else {}
    return {
        **extra,
        "atomic_energies": json.dumps(references),
        "megagnn_version": megagnn.__version__,
        "format": "megagnn-aoti-1",
        "inputs": ",".join(INPUTS),
        "outputs": "energy,forces,stress,energies",
        "cutoff": repr(float(cfg.cutoff)),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "heads": ",".join(cfg.heads),
        "forces": cfg.forces,
        "stress": str(bool(cfg.stress and cfg.forces == "conservative")).lower(),
        "elements": ",".join(map(str, elements)),
        "max_z": str(cfg.max_z),
        "units": "energy eV, length Å, forces eV/Å, stress eV/Å^3",
        "model_config": json.dumps(config_to_dict(cfg)),
    }


def export_program(
    model: Potential, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> torch.export.ExportedProgram:
    """The package's graph before compilation: ``model`` (on ``device`` in ``dtype``) traced
    with forces and stress for one structure of any atom and edge count."""
    from torch.fx.experimental.proxy_tensor import make_fx

    serve = _Serve(model)
    example = example_inputs(model, dtype, device)
    # the weights enter the trace as constants: as inputs they would get symbolic sizes too,
    # and a weight dimension equal to the example's atom count would be unified with it
    flags = [p.requires_grad for p in serve.parameters()]
    for p in serve.parameters():
        p.requires_grad_(False)
    try:
        # the package is a portable graph of torch ops: the PyTorch references, not kernels,
        # in the form Inductor fuses
        with ops.tracing_for_compiler():
            graph = make_fx(serve, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    finally:
        for p, flag in zip(serve.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    atoms, edges = torch.export.Dim("atoms", min=1), torch.export.Dim("edges", min=0)
    shapes = ({0: atoms}, {0: atoms}, None, None, {1: edges}, {0: edges}, None)
    return torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)


def export_package(
    model: Potential,
    path: str | Path,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    run_config: dict | None = None,
) -> Path:
    """Compile ``model`` (one process, any weights) into an AOTInductor package at ``path``
    for ``device`` ('cpu', or 'cuda': compiled for this machine's GPU, its kernels
    generated by inductor). ``run_config``: the training run's whole config, kept in the
    metadata so that ``megagnn.evaluate`` finds the data and split the model was tested on."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an inference package is a .pt2 file, not {path.name}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"package device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "a CUDA package is compiled for the GPU of the machine that builds it: "
            "run this on a machine with CUDA (this one has none)"
        )
    model = model.to(device, dtype).eval()
    program = export_program(model, dtype, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.pt2")
    configs = {"aot_inductor.metadata": metadata(model, dtype, device, run_config)}
    clean_inductor_cache()  # a build killed mid-link must not break every later one
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp), inductor_configs=configs
    )
    tmp.replace(path)  # a package that exists is a complete one
    return path


class Package:
    """A loaded inference package: ``package(*inputs)`` -> (energy, forces, stress) and,
    from packages that have them, per-atom energies (``has_energies``)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no inference package at {path}")
        try:  # a cut-short archive fails here, in one line, before the C++ loader sees it
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise PackageError(f"{path}: corrupt or truncated inference package ({e})") from e
        # the loader warns when the package was compiled without vector instructions
        quiet = logging.getLogger("torch.export.pt2_archive._package")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # the C++ loader's errors carry a stack trace
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PackageError(f"{path}: unreadable inference package ({reason})") from e
        finally:
            quiet.setLevel(level)
        self.metadata = dict(self.runner.get_metadata())
        if self.metadata.get("format") != "megagnn-aoti-1":
            raise PackageError(f"{path} is not a megagnn inference package")
        self.cutoff = float(self.metadata["cutoff"])
        self.dtype = getattr(torch, self.metadata["dtype"])
        self.has_stress = self.metadata["stress"] == "true"
        self.has_energies = "energies" in self.metadata.get("outputs", "")
        self.device = torch.device(self.metadata.get("device", "cpu"))
        # the elements the model was trained on (None: recorded nothing, checks nothing)
        listed = self.metadata.get("elements", "")
        self.elements = {int(z) for z in listed.split(",") if z} or None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(energy, forces, stress[, energies]) on the package's device, from inputs on any
        device."""
        return tuple(self.runner(*(t.to(self.device) for t in inputs)))


class PackagePotential(nn.Module):
    """A package behind a Potential's batch interface (for ``megagnn.evaluate``): each
    structure of a batch goes through the package in turn."""

    def __init__(self, package: Package):
        super().__init__()
        self.package = package
        self.cfg = config_from_dict({"model": json.loads(package.metadata["model_config"])}).model
        table = json.loads(package.metadata.get("atomic_energies", "[]"))
        energies = torch.zeros(len(self.cfg.heads), self.cfg.max_z + 1, dtype=torch.float64)
        for h, entries in enumerate(table):
            for z, e in entries.items():
                energies[h, int(z)] = e
        self.register_buffer("atomic_energies", energies)
        self.register_buffer("scale", torch.ones(len(self.cfg.heads)))
        self.has_references = bool(table)  # packages before 2026-12 did not record them

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        energies, forces, stresses = [], [], []
        offsets = [0, *torch.cumsum(batch[K.N_ATOMS], 0).tolist()]
        edge_graph = batch[K.BATCH][batch[K.EDGE_INDEX][1]]
        for b in range(len(offsets) - 1):
            lo, hi = offsets[b], offsets[b + 1]
            keep = edge_graph == b
            inputs = (
                batch[K.POSITIONS][lo:hi],
                batch[K.ATOMIC_NUMBERS][lo:hi],
                batch[K.CELL][b],
                batch[K.PBC][b],
                batch[K.EDGE_INDEX][:, keep] - lo,
                batch[K.CELL_SHIFTS][keep],
                batch[K.HEAD][b],
            )
            energy, force, stress = (t.to(batch[K.POSITIONS]) for t in self.package(*inputs)[:3])
            energies.append(energy.reshape(1))
            forces.append(force)
            stresses.append(stress.reshape(1, 3, 3))
        out = {K.ENERGY: torch.cat(energies), K.FORCES: torch.cat(forces)}
        if self.package.has_stress:
            out[K.STRESS] = torch.cat(stresses)
        return out


def load_package(path: str | Path) -> Package:
    return Package(path)
