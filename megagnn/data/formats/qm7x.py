"""QM7-X (Hoja et al., Sci. Data 2021): 4.2M conformers of small organic molecules (up to
seven heavy atoms), PBE0+MBD, in HDF5 files (``1000.hdf5`` ... ``8000.hdf5``) laid out
file -> molecule -> conformer:

    /<molecule id>/<conformer name>/atNUM [N], atXYZ [N, 3] Å, ePBE0+MBD [1] eV,
                                    totFOR [N, 3] eV/Å, ...

Already in eV and Å. ``--energy-key`` picks another energy dataset of the conformer (e.g.
``eDFTB+MBD``); forces are ``totFOR`` (the PBE0+MBD total forces) only with the default
energy. Every conformer of one molecule shares its split group (``qm7x-<molecule id>``:
QM7-X's conformers of a molecule are near-duplicates); the record id is the conformer name.
A file splits into chunks of whole molecules.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np
from ase import Atoms

from megagnn.data.formats.molecules_h5 import groups
from megagnn.data.shards import DataError

ENERGY = "ePBE0+MBD"
FORCES = "totFOR"


def is_qm7x(path: str) -> bool:
    """An HDF5 file whose first group holds conformer groups with atNUM and atXYZ."""
    if not path.endswith((".h5", ".hdf5")):
        return False
    try:
        with h5py.File(path, "r") as f:
            molecule = next(iter(f.values()), None)
            if not isinstance(molecule, h5py.Group):
                return False
            conformer = next(iter(molecule.values()), None)
            return isinstance(conformer, h5py.Group) and {"atNUM", "atXYZ"} <= set(conformer)
    except OSError:
        return False


def units(path: str) -> list[int]:
    """Conformers per molecule, in file order (a chunk holds whole molecules)."""
    with h5py.File(path, "r") as f:
        return [len(molecule) for molecule in f.values()]


def read(
    path: str, energy_key: str = "energy", span: tuple[int, int] | None = None
) -> Iterator[Atoms]:
    """The conformers of molecules ``span`` (all by default) of one QM7-X file."""
    level = ENERGY if energy_key == "energy" else energy_key
    for name, molecule in groups(path, span):
        for conformer, group in molecule.items():
            try:
                atoms = _conformer(group, level)
            except (KeyError, ValueError, TypeError) as e:
                raise DataError(f"{path}: {name}/{conformer}: malformed QM7-X record ({e})") from e
            atoms.info.update(group=f"qm7x-{name}", id=conformer)
            yield atoms


def _conformer(group, level: str) -> Atoms:
    if level not in group:
        raise KeyError(f"no {level!r}; it has {sorted(group.keys())}")
    numbers = np.asarray(group["atNUM"], dtype=np.int64).reshape(-1)
    positions = np.asarray(group["atXYZ"], dtype=np.float64).reshape(len(numbers), 3)
    atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
    energy = float(np.asarray(group[level], dtype=np.float64).reshape(-1)[0])
    if np.isfinite(energy):
        atoms.info["energy"] = energy
    if level == ENERGY and FORCES in group:
        forces = np.asarray(group[FORCES], dtype=np.float64).reshape(len(numbers), 3)
        if np.isfinite(forces).all():
            atoms.arrays["forces"] = forces
    return atoms
