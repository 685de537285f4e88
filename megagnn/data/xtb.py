"""The harder built-in dataset: GFN1-xTB (tblite) energies, forces and stresses of
molecules, random clusters and periodic crystals of 23 elements.

On the EMT alloys a model of 10^5 parameters is saturated by a few hundred structures, so
the data axis of a scaling study is flat there. This set mixes chemistries and geometries a
model has to learn separately:
- conformers of the G2 molecules (H C N O F Si P S Cl; thermal distortions at 300, 800 and
  1500 K amplitudes);
- Langevin MD of the same molecules driven by GFN1-xTB at those temperatures (five frames
  per trajectory, ten 0.5 fs steps apart);
- random clusters of 4-10 light atoms (far from equilibrium, each its own group);
- strained and rattled crystals: 12 elemental solids and 15 binary compounds (rocksalt,
  zincblende, CsCl), and random substitutional binaries of the elemental ones, repeated to
  at least 4.5 Å in every direction (4-32 atoms).
One method labels all of it (GFN1-xTB, the tblite parametrisation that supports periodic
cells; Γ-point only, a consistent if coarse energy surface for small cells).

Groups: every structure made from one G2 molecule shares ``mol-<name>`` (its conformers and
MD frames are near-duplicates); each crystal and each cluster is drawn once and is its own
group. Generation is split into chunks seeded by (seed, chunk), so any
number of ``--workers`` writes the same file. Draws with atoms closer than 0.85 x their covalent
radii, an SCF that does not converge or a force above 50 eV/Å are redrawn (counted in the
progress bar). Cost on one CPU core: about 3 ms per molecule single point,
30-340 ms per crystal (GFN1-xTB, tblite 0.4); see the README for a measured total.

    python tools/generate_xtb_data.py -o data/xtb/raw.extxyz -n 20000 --workers 2
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.collections import g2
from tqdm import tqdm

from megagnn.data.shards import generate_extxyz_main

METHOD = "GFN1-xTB"
MOLECULE_ELEMENTS = {"H", "C", "N", "O", "F", "Si", "P", "S", "Cl"}
CLUSTER_ELEMENTS = ["H", "C", "N", "O", "F", "S", "Cl"]
TEMPERATURES = (300.0, 800.0, 1500.0)
# (symbol, crystal structure, a in Å, c in Å or None): elemental solids
ELEMENTAL = [
    ("Li", "bcc", 3.51, None),
    ("Na", "bcc", 4.23, None),
    ("Fe", "bcc", 2.87, None),
    ("Al", "fcc", 4.05, None),
    ("Ca", "fcc", 5.58, None),
    ("Ni", "fcc", 3.52, None),
    ("Cu", "fcc", 3.61, None),
    ("Mg", "hcp", 3.21, 5.21),
    ("Ti", "hcp", 2.95, 4.68),
    ("Zn", "hcp", 2.66, 4.95),
    ("Si", "diamond", 5.43, None),
    ("C", "diamond", 3.57, None),
]
COMPOUNDS = [
    ("NaCl", "rocksalt", 5.64),
    ("KCl", "rocksalt", 6.29),
    ("LiF", "rocksalt", 4.03),
    ("NaF", "rocksalt", 4.63),
    ("LiH", "rocksalt", 4.08),
    ("MgO", "rocksalt", 4.21),
    ("CaO", "rocksalt", 4.81),
    ("SiC", "zincblende", 4.36),
    ("AlP", "zincblende", 5.46),
    ("ZnS", "zincblende", 5.41),
    ("ZnO", "zincblende", 4.58),
    ("CuCl", "zincblende", 5.42),
    ("GaAs", "zincblende", 5.65),
    ("CsCl", "cesiumchloride", 4.12),
    ("NiAl", "cesiumchloride", 2.88),
]
# share of structures of each kind
KINDS = {"conformer": 0.25, "md": 0.25, "cluster": 0.15, "crystal": 0.35}
MD_FRAMES, MD_STRIDE, MD_STEP_FS = 5, 10, 0.5
CHUNK = 50  # structures per chunk (the unit of work of one worker)
MIN_BOND = 0.85  # reject geometries with atoms closer than this x their covalent radii
MAX_FORCE = 50.0  # eV/Å: reject labels above it (fused atoms, xTB failure modes)
MIN_WIDTH, MAX_CELL_ATOMS = 4.5, 32  # Å, and the most atoms a crystal is repeated to


def templates() -> list[str]:
    """G2 molecules made of MOLECULE_ELEMENTS with at least two atoms (sorted)."""
    return sorted(
        n
        for n in g2.names
        if set(g2[n].get_chemical_symbols()) <= MOLECULE_ELEMENTS and len(g2[n]) > 1
    )


def calculator():
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise RuntimeError("the xTB data needs tblite: pip install tblite") from err
    return TBLite(method=METHOD, verbosity=0)


def amplitude(temperature: float) -> float:
    """Gaussian displacement width (Å) standing in for thermal motion at ``temperature``."""
    return 0.06 * np.sqrt(temperature / 300.0)


def too_close(atoms: Atoms, min_bond: float = MIN_BOND) -> bool:
    """Whether two atoms (periodic images included) are closer than ``min_bond`` x the sum
    of their covalent radii."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, 2 * min_bond * covalent_radii.max())
    r = covalent_radii[atoms.numbers]
    return bool(np.any(d < min_bond * (r[i] + r[j])))


def labelled(atoms: Atoms, calc, group: str, min_bond: float = MIN_BOND) -> Atoms | None:
    """A copy with GFN1-xTB energy, forces (and stress for crystals), or None if the
    geometry is implausible (``too_close``), the SCF failed or a force exceeds MAX_FORCE."""
    if too_close(atoms, min_bond):
        return None
    atoms = atoms.copy()
    atoms.calc = calc
    try:
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
    except Exception:  # tblite raises a bare exception when the SCF does not converge
        return None
    if not all(np.isfinite(np.asarray(v)).all() for v in results.values()):
        return None
    if np.abs(results["forces"]).max() > MAX_FORCE:
        return None
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["group"] = group
    return atoms


def _molecule(rng: np.random.Generator, names: list[str]) -> tuple[Atoms, str]:
    name = names[rng.integers(len(names))]
    return molecule(name), f"mol-{name}"


def _cluster(rng: np.random.Generator) -> Atoms:
    """4-10 atoms placed one by one no closer to the others than 0.9 x the sum of their
    covalent radii (compressed bonds, not fused atoms)."""
    from ase.data import atomic_numbers, covalent_radii

    n = int(rng.integers(4, 11))
    symbols = list(rng.choice(CLUSTER_ELEMENTS, n, p=[0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.06]))
    radii = np.array([covalent_radii[atomic_numbers[s]] for s in symbols])
    box = 1.8 * n ** (1 / 3) + 1.0
    positions: list[np.ndarray] = []
    for k in range(n):
        while True:
            p = rng.uniform(0, box, 3)
            if all(
                np.linalg.norm(p - q) >= 0.9 * (radii[k] + radii[j])
                for j, q in enumerate(positions)
            ):
                positions.append(p)
                break
    return Atoms(symbols, positions=np.array(positions))


def heights(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a cell (its widths along the three normals)."""
    volume = abs(np.linalg.det(cell))
    return volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)


def _widened(atoms: Atoms) -> Atoms:
    """Repeat the cell along its narrowest direction until every width is at least
    MIN_WIDTH Å (or MAX_CELL_ATOMS would be passed): GFN1-xTB samples only the Γ point, which
    is a disaster in a 1-atom metal cell (energies tens of eV/atom off)."""
    while heights(atoms.cell[:]).min() < MIN_WIDTH:
        k = int(np.argmin(heights(atoms.cell[:])))
        if 2 * len(atoms) > MAX_CELL_ATOMS:
            break
        atoms = atoms * tuple(2 if i == k else 1 for i in range(3))
    return atoms


def _crystal(rng: np.random.Generator) -> Atoms:
    """A strained crystal: an elemental solid (plain or a random substitutional binary) or a
    binary compound, repeated until it is at least MIN_WIDTH Å wide."""
    if rng.random() < 0.5:
        symbol, structure, a, c = ELEMENTAL[rng.integers(len(ELEMENTAL))]
        atoms = bulk(symbol, structure, a=a, c=c) if c else bulk(symbol, structure, a=a)
        # substitute a random share with an element of the same lattice and similar size
        alike = [
            e[0]
            for e in ELEMENTAL
            if e[1] == structure and e[0] != symbol and abs(e[2] / a - 1) < 0.12
        ]
        if alike and rng.random() < 0.4:
            atoms = atoms * (2, 2, 1)
            swap = rng.random(len(atoms)) < rng.uniform(0.1, 0.5)
            atoms.symbols[swap] = alike[rng.integers(len(alike))]
    else:
        formula, structure, a = COMPOUNDS[rng.integers(len(COMPOUNDS))]
        atoms = bulk(formula, structure, a=a)
    atoms = _widened(atoms)
    strain = rng.normal(0, 0.02, (3, 3))
    scale = rng.uniform(0.96, 1.06)
    cell = atoms.cell[:] @ (scale * np.eye(3) + 0.5 * (strain + strain.T))
    atoms.set_cell(cell, scale_atoms=True)
    return atoms


def md_frames(
    atoms: Atoms,
    calc,
    temperature: float,
    rng: np.random.Generator,
    group: str,
    frames: int = MD_FRAMES,
    stride: int = MD_STRIDE,
    min_bond: float = MIN_BOND,
):
    """``frames`` frames, ``stride`` steps apart, of a short GFN1-xTB Langevin trajectory at
    ``temperature``."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = atoms.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, MD_STEP_FS * units.fs, temperature_K=temperature, friction=0.05, fixcm=False, rng=rng
    )
    for _ in range(frames):
        try:
            dyn.run(stride)
        except Exception:  # SCF failure mid-trajectory: end the trajectory here
            return
        frame = labelled(atoms, calc, group, min_bond)
        if frame is None:
            return
        yield frame


def generate_chunk(seed: int, chunk: int, size: int) -> tuple[list[Atoms], int]:
    """``size`` labelled structures of chunk ``chunk`` (seeded by (seed, chunk) alone) and
    the number of draws rejected (implausible geometry, SCF failure, extreme force)."""
    rng = np.random.default_rng([seed, chunk])
    calc, names = calculator(), templates()
    kinds = list(KINDS)
    # an MD draw yields MD_FRAMES structures: draw it less often, so KINDS are structure shares
    weights = np.array([w / (MD_FRAMES if k == "md" else 1) for k, w in KINDS.items()])
    out: list[Atoms] = []
    failed = draw = 0
    while len(out) < size:
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        tag = f"s{seed}-{chunk}-{draw}"
        draw += 1
        temperature = float(rng.choice(TEMPERATURES))
        if kind == "md":
            atoms, group = _molecule(rng, names)
            frames = list(md_frames(atoms, calc, temperature, rng, group))
            failed += len(frames) < MD_FRAMES
            out += frames[: size - len(out)]
            continue
        if kind == "conformer":
            atoms, group = _molecule(rng, names)
        elif kind == "cluster":
            atoms, group = _cluster(rng), f"cluster-{tag}"
        else:
            atoms, group = _crystal(rng), f"crystal-{tag}"
        atoms.positions += rng.normal(0, amplitude(temperature), atoms.positions.shape)
        result = labelled(atoms, calc, group)
        if result is None:
            failed += 1
        else:
            out.append(result)
    return out, failed


def to_text(structures: list[Atoms]) -> str:
    """Labelled structures as extxyz text: what workers send back (Atoms with calculators
    do not pickle cheaply)."""
    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, structures, format="extxyz")
    return buffer.getvalue()


def from_text(text: str) -> Iterator[Atoms]:
    import ase.io

    yield from ase.io.iread(io.StringIO(text), index=":", format="extxyz")


def in_order(work, tasks: Iterable, workers: int) -> Iterator:
    """``work(task)`` of every task, in order: here, or over ``workers`` spawned processes
    of one thread each."""
    if workers <= 1:
        yield from map(work, tasks)
        return
    with one_thread_per_worker():
        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield from pool.imap(work, tasks)
    finally:
        pool.terminate()


def _chunk_text(args: tuple[int, int, int]) -> tuple[str, int, int]:
    """One chunk as extxyz text, its structure count and its rejected draws."""
    structures, failed = generate_chunk(*args)
    return to_text(structures), len(structures), failed


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def one_thread_per_worker():
    """Spawned workers inherit this environment: one OpenMP/BLAS thread each. tblite
    otherwise starts a thread per core in every worker, and two workers on two cores run
    4x slower than one (measured: 45 s against 12 s per chunk)."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def generate(n: int, seed: int = 0, progress: bool = True, workers: int = 1) -> Iterator[Atoms]:
    """Yield ``n`` labelled structures, chunk by chunk in order; the same for any
    ``workers``."""
    tasks = [(seed, k, min(CHUNK, n - k * CHUNK)) for k in range(-(-n // CHUNK))]
    bar = tqdm(total=n, desc="GFN1-xTB data", unit=" structures", disable=not progress)
    failed = 0
    results = in_order(_chunk_text, tasks, workers)
    try:
        for text, count, bad in results:
            failed += bad
            yield from from_text(text)
            bar.update(count)
            bar.set_postfix(rejected=failed)
    finally:
        results.close()  # ends the worker pool even when the caller stops early
        bar.close()


def main(argv: list[str] | None = None) -> int:
    return generate_extxyz_main(
        argv,
        generate,
        description="Generate the harder dataset: GFN1-xTB (tblite) energies, forces and "
        "stresses of G2 molecules (conformers and MD at 300/800/1500 K), random clusters and "
        "strained crystals of 23 elements, as extxyz with a group per G2 molecule "
        "(each crystal and cluster its own).",
        default_num=20000,
        noun="structures",
        parallel=True,
    )
