"""The built-in default dataset: fcc metal alloys labelled by ASE's EMT calculator.

Rattled and strained bulk cells (cubic and triclinic, some with a vacancy) and snapshots
of short Langevin MD, with energies, forces and stresses. Runs offline in seconds.

Every structure carries a group (``atoms.info["group"]``): the frames of one MD trajectory
share one, a rattled cell has its own, so splits keep near-duplicate frames together.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, reference_states
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from tqdm import tqdm

from megagnn.data.shards import generate_extxyz_main

ELEMENTS = ["Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"]


def _lattice_constant(symbols: list[str], fractions: np.ndarray) -> float:
    """Vegard's law over the elements' fcc lattice constants."""
    a = [reference_states[atomic_numbers[s]]["a"] for s in symbols]
    return float(np.dot(fractions, a))


def random_cell(rng: np.random.Generator) -> Atoms:
    """A random fcc alloy supercell, strained and possibly with a vacancy (not yet rattled)."""
    n_el = rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3])
    symbols = list(rng.choice(ELEMENTS, size=n_el, replace=False))
    fractions = rng.dirichlet(np.ones(n_el))
    a = _lattice_constant(symbols, fractions) * rng.uniform(0.97, 1.04)
    if rng.random() < 0.5:
        atoms = bulk("Cu", "fcc", a=a, cubic=True) * (2, 2, 2)  # 32 atoms, orthorhombic
    else:
        atoms = bulk("Cu", "fcc", a=a) * (3, 3, 3)  # 27 atoms, triclinic
    atoms.symbols = list(rng.choice(symbols, size=len(atoms), p=fractions))
    strain = rng.normal(0, 0.015, (3, 3))
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
    if rng.random() < 0.2:
        del atoms[int(rng.integers(len(atoms)))]
    return atoms


def labelled(atoms: Atoms) -> Atoms:
    """A copy carrying EMT energy, forces and stress as a single-point result."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(),
    }
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


FRAMES_PER_TRAJECTORY = 5


def with_group(atoms: Atoms, group: str) -> Atoms:
    atoms.info["group"] = group
    return atoms


def generate(n: int, seed: int = 0, md_fraction: float = 0.4, progress: bool = True):
    """Yield ``n`` labelled structures; about ``md_fraction`` of them are MD snapshots
    (``FRAMES_PER_TRAJECTORY`` frames 20 fs apart per trajectory, one group each)."""
    rng = np.random.default_rng(seed)
    bar = tqdm(total=n, desc="EMT data", unit=" structures", disable=not progress)
    # a parent cell starts a trajectory with probability p: p * F / (p * F + 1 - p) of the
    # structures are then MD frames
    frames = FRAMES_PER_TRAJECTORY
    p_md = md_fraction / (frames - (frames - 1) * md_fraction) if md_fraction < 1 else 1.0
    made = parent = 0
    while made < n:
        atoms = random_cell(rng)
        group = f"emt-s{seed}-{parent}"
        parent += 1
        if rng.random() < p_md:
            atoms.calc = EMT()
            temperature = rng.uniform(300, 1500)
            thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
            dyn = Langevin(
                atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng
            )
            for _ in range(min(frames, n - made)):
                dyn.run(10)
                yield with_group(labelled(atoms), group)
                made += 1
                bar.update()
        else:
            atoms.rattle(stdev=rng.uniform(0.02, 0.2), seed=int(rng.integers(2**31)))
            yield with_group(labelled(atoms), group)
            made += 1
            bar.update()
    bar.close()


def main(argv: list[str] | None = None) -> int:
    return generate_extxyz_main(
        argv,
        generate,
        description="Generate the default dataset: fcc alloys (Al Ni Cu Pd Ag Pt Au) "
        "labelled with ASE's EMT calculator, written as extxyz with energy, forces, stress.",
        default_num=1500,
        noun="structures",
    )
