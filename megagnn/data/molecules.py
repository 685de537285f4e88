"""Second default dataset: small organic molecules (H, C, N, O) from ASE's G2 set, distorted,
labelled with GFN2-xTB (tblite) energies and forces. Non-periodic, so no stress: the
molecular head of a multi-dataset run trains energies and forces only.

    python tools/generate_molecule_data.py -o data/molecules/raw.extxyz -n 500

Needs ``pip install tblite`` (in megagnn's [test] and [molecules] extras).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.collections import g2
from tqdm import tqdm

from megagnn.data.shards import generate_extxyz_main

ELEMENTS = {"H", "C", "N", "O"}
MAX_ATOMS = 12


def templates() -> list[str]:
    """Closed-shell G2 molecules made only of H, C, N, O with 3..MAX_ATOMS atoms (sorted:
    reproducible); radicals are left out (their spin state is not a single-point default)."""
    return sorted(
        name
        for name in g2.names
        if set(g2[name].get_chemical_symbols()) <= ELEMENTS
        and 3 <= len(g2[name]) <= MAX_ATOMS
        and sum(g2[name].numbers) % 2 == 0
    )


def calculator():
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise RuntimeError("the molecule data needs tblite: pip install tblite") from err
    return TBLite(method="GFN2-xTB", verbosity=0)


def generate(n: int, seed: int = 0, progress: bool = True):
    """Yield ``n`` labelled molecules: random G2 templates, every atom displaced by Gaussian
    noise of a random width (0.02-0.15 Å), so energies and forces span near-equilibrium.
    The distortions of one template are near-duplicates: they share its name as group."""
    rng = np.random.default_rng(seed)
    names = templates()
    calc = calculator()
    for _ in tqdm(range(n), desc="GFN2 data", unit=" molecules", disable=not progress):
        name = names[rng.integers(len(names))]
        atoms: Atoms = molecule(name)
        atoms.info["group"] = f"g2-{name}"
        atoms.positions += rng.normal(0, rng.uniform(0.02, 0.15), atoms.positions.shape)
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        yield atoms


def main(argv: list[str] | None = None) -> int:
    return generate_extxyz_main(
        argv,
        generate,
        description="Generate the molecular dataset: distorted G2 molecules (H C N O, up to "
        f"{MAX_ATOMS} atoms) labelled with GFN2-xTB (tblite), as extxyz with energy and forces.",
        default_num=500,
        noun="molecules",
    )
