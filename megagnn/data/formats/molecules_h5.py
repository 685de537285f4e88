"""Molecular conformer datasets in HDF5, one group per molecule (or formula), each holding
all its conformers as stacked arrays:

- **ANI-1x** (Smith et al., Sci. Data 2020): ``atomic_numbers`` [N], ``coordinates``
  [C, N, 3] Å, ``wb97x_dz.energy`` [C] hartree, ``wb97x_dz.forces`` [C, N, 3] hartree/Å;
  NaN marks a label not computed at that level. ``--energy-key`` picks another level
  (e.g. ``ccsd(t)_cbs.energy``; its forces: the same prefix with ``.forces`` where present).
- **SPICE** (Eastman et al., Sci. Data 2023): ``atomic_numbers`` [N], ``conformations``
  [C, N, 3] bohr, ``dft_total_energy`` [C] hartree, ``dft_total_gradient`` [C, N, 3]
  hartree/bohr (forces are minus it).

Every conformer of one HDF5 group shares that group as its split group: conformers of one
molecule are near-duplicates. A NaN label is left out of the record (its loss term is
masked), never stored as a number.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np
from ase import Atoms
from ase.units import Bohr, Hartree

from megagnn.data.shards import DataError

ANI1X_ENERGY = "wb97x_dz.energy"


def detect(path: str) -> str | None:
    """'ani1x' or 'spice' by the keys of the file's first group, else None."""
    if not path.endswith((".h5", ".hdf5")):
        return None
    try:
        with h5py.File(path, "r") as f:
            first = next(iter(f.values()), None)
            keys = set(first.keys()) if isinstance(first, h5py.Group) else set()
    except OSError:
        return None
    if {"coordinates", "atomic_numbers", ANI1X_ENERGY} <= keys:
        return "ani1x"
    if {"conformations", "atomic_numbers", "dft_total_energy"} <= keys:
        return "spice"
    return None


def _atoms(numbers, positions, energy, forces, group: str, conformer: int) -> Atoms:
    atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
    atoms.info["group"] = group
    atoms.info["id"] = f"{group}/{conformer}"
    if energy is not None and np.isfinite(energy):
        atoms.info["energy"] = float(energy)
    if forces is not None and np.isfinite(forces).all():
        atoms.arrays["forces"] = np.asarray(forces, dtype=np.float64)
    return atoms


def units(path: str, kind: str) -> list[int]:
    """Conformers per HDF5 group, in file order (a chunk holds whole groups)."""
    key = "coordinates" if kind == "ani1x" else "conformations"
    with h5py.File(path, "r") as f:
        return [len(group[key]) if key in group else 1 for group in f.values()]


def read(
    path: str, kind: str, energy_key: str = "energy", span: tuple[int, int] | None = None
) -> Iterator[Atoms]:
    """The conformers of the HDF5 groups ``span`` (all by default) of an ANI-1x or SPICE
    file in eV and Å, one group at a time."""
    for name, group in groups(path, span):
        try:
            yield from _group(kind, name, group, energy_key)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}: group {name!r}: malformed {kind} record ({e})") from e


def groups(path: str, span: tuple[int, int] | None = None) -> Iterator[tuple[str, h5py.Group]]:
    """(name, group) of the top-level HDF5 groups ``span`` (all by default) of ``path``,
    in file order; an unreadable file is named."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        names = list(f.keys())
        for name in names[slice(*span) if span else slice(None)]:
            yield name, f[name]


def _group(kind: str, name: str, group, energy_key: str) -> Iterator[Atoms]:
    numbers = np.asarray(group["atomic_numbers"], dtype=np.int64)
    if kind == "ani1x":
        level = ANI1X_ENERGY if energy_key == "energy" else energy_key
        if level not in group:
            raise KeyError(f"no {level!r}; it has {sorted(group.keys())}")
        positions = np.asarray(group["coordinates"], dtype=np.float64)
        energies = np.asarray(group[level], dtype=np.float64) * Hartree
        forces_key = level.rsplit(".", 1)[0] + ".forces"
        forces = group[forces_key] if forces_key in group else None
        scale = Hartree  # hartree/Å -> eV/Å
    elif kind == "spice":
        positions = np.asarray(group["conformations"], dtype=np.float64) * Bohr
        energies = np.asarray(group["dft_total_energy"], dtype=np.float64) * Hartree
        forces = group["dft_total_gradient"] if "dft_total_gradient" in group else None
        scale = -Hartree / Bohr  # hartree/bohr gradient -> eV/Å forces
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if positions.ndim != 3 or positions.shape[1:] != (len(numbers), 3):
        raise ValueError(f"positions of shape {positions.shape} for {len(numbers)} atoms")
    forces = None if forces is None else np.asarray(forces, dtype=np.float64) * scale
    for c in range(len(positions)):
        yield _atoms(
            numbers, positions[c], energies[c], None if forces is None else forces[c], name, c
        )
