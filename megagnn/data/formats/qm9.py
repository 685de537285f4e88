"""QM9 (Ramakrishnan et al., Sci. Data 2014): small organic molecules (C, H, N, O, F; at
most nine heavy atoms) with B3LYP/6-31G(2df,p) geometries and energies, read from the CSV
files that the ``qm9pack`` wheel installs (``pip install "megagnn[qm9]"``; nothing is
downloaded at run time). One row per molecule: ``Index``, ``Elements`` (a Python list of
symbols), ``XYZ_Ang`` (positions, Å) and the energies in hartree: ``InternalEnergy_0K_au``
(U0), ``InternalEnergy_298K_au`` (U), ``Enthalphy_298K_au`` (H, the file's spelling),
``GibbsFreeEnergy_298K_au`` (G). Energies only: QM9 has no forces.

Each molecule is its own group (``qm9-<Index>``): QM9 holds one geometry per molecule.
"""

from __future__ import annotations

import ast
import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import Hartree

from megagnn.data.shards import DataError

ENERGIES = {
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
}
"""--energy-key -> the column it reads (hartree); the default, 'energy', reads U0."""
HEADER = ("Index", "Elements", "XYZ_Ang", ENERGIES["U0"])


def installed_files() -> list[str]:
    """The CSV files of the installed ``qm9pack``, in order."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("qm9pack")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "QM9 needs the qm9pack package (about 100 MB, all 130,831 molecules): "
            'pip install "megagnn[qm9]", or give the CSV files'
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(str(p) for p in folder.glob("qm9_part*.csv"))
    if not files:
        raise DataError(f"no qm9_part*.csv in {folder}: a damaged qm9pack install")
    return files


def is_qm9(path: str) -> bool:
    """Whether ``path`` is a QM9 CSV file in qm9pack's layout (by its header)."""
    if not path.endswith(".csv"):
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return all(name in header for name in HEADER)


def energy_column(key: str) -> str:
    """The column of ``--energy-key`` (U0, U, H or G; 'energy' means U0)."""
    if key == "energy":
        return ENERGIES["U0"]
    if key not in ENERGIES:
        raise DataError(f"--energy-key {key!r}: QM9 has {', '.join(ENERGIES)} (default U0)")
    return ENERGIES[key]


def read(path: str, energy_key: str = "energy") -> Iterator[Atoms]:
    """The molecules of one QM9 CSV file, streamed row by row: ``info["energy"]`` in eV,
    ``info["group"]`` and ``info["id"]`` (the record id) from the row's Index."""
    column = energy_column(energy_key)
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        missing = [name for name in (*HEADER, column) if name not in (rows.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: not a QM9 CSV file (no column {', '.join(missing)})")
        for line, row in enumerate(rows, start=2):
            try:
                symbols = ast.literal_eval(row["Elements"])
                # numbers such as "0." are Python but not JSON
                flat = row["XYZ_Ang"].replace("[", "").replace("]", "").split(",")
                positions = np.array([float(x) for x in flat]).reshape(-1, 3)
                energy = float(row[column]) * Hartree
                index = int(row["Index"])
                atoms = Atoms(symbols=symbols, positions=positions, pbc=False)
            except (ValueError, SyntaxError, TypeError, KeyError) as e:
                raise DataError(
                    f"{path}:{line}: malformed QM9 row ({type(e).__name__}: {e})"
                ) from e
            atoms.info.update(energy=energy, group=f"qm9-{index}", id=str(index))
            yield atoms
