"""ASE-readable files -> validated structures -> HDF5 shards + dataset.json."""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress
from tqdm import tqdm

from megagnn.data.neighbors import neighbor_list
from megagnn.data.shards import DataError, ShardWriter, Structure


def _property(atoms: Atoms, name: str, key: str | None) -> np.ndarray | float | None:
    """A target from the attached calculator, or from atoms.info / atoms.arrays by key."""
    if key is not None:
        if key in atoms.info:
            return atoms.info[key]
        if key in atoms.arrays:
            return atoms.arrays[key]
    calc = atoms.calc
    if calc is not None and name in getattr(calc, "results", {}):
        return calc.results[name]
    return None


def to_structure(
    atoms: Atoms,
    min_distance: float = 0.5,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
) -> Structure:
    """Validate one ASE structure; raise DataError saying what is wrong."""
    n = len(atoms)
    if n == 0:
        raise DataError("structure has no atoms")
    z = atoms.get_atomic_numbers()
    if (z < 1).any() or (z > 118).any():
        raise DataError(f"atomic numbers out of range 1..118: {sorted(set(z.tolist()))}")
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not np.isfinite(pos).all():
        raise DataError("positions contain NaN or inf")
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    if not np.isfinite(cell).all():
        raise DataError("cell contains NaN or inf")
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        if (lengths[pbc] < 1e-6).any():
            raise DataError(f"periodic direction with a zero cell vector (cell lengths {lengths})")
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-6:
            raise DataError("periodic cell has zero volume")

    energy = _property(atoms, "energy", energy_key)
    if energy is None:
        raise DataError("no energy (neither a calculator result nor info/arrays key)")
    energy = float(np.asarray(energy).reshape(()))
    if not np.isfinite(energy):
        raise DataError(f"energy is {energy}")

    forces = _property(atoms, "forces", forces_key)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise DataError(f"forces have shape {forces.shape}, expected ({n}, 3)")
        if not np.isfinite(forces).all():
            raise DataError("forces contain NaN or inf")

    stress = _property(atoms, "stress", stress_key)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (6,):
            stress = voigt_6_to_full_3x3_stress(stress)
        if stress.shape != (3, 3):
            raise DataError(f"stress has shape {stress.shape}, expected (6,) or (3, 3)")
        if not np.isfinite(stress).all():
            raise DataError("stress contains NaN or inf")
        if not pbc.all():
            stress = None  # stress is defined only for fully periodic cells

    if min_distance > 0:  # periodic images count: a small cell can overlap itself
        edges, shifts = neighbor_list(pos, cell, pbc, min_distance)
        if edges.shape[1]:
            i, j = edges[1, 0], edges[0, 0]
            d = np.linalg.norm(pos[j] - pos[i] + shifts[0] @ cell)
            what = f"atom {i} and its periodic image" if i == j else f"atoms {i} and {j}"
            raise DataError(f"{what} overlap ({d:.3f} Å < {min_distance} Å)")

    return Structure(z.astype(np.int64), pos, cell, pbc, energy, forces, stress)


def iter_inputs(patterns: list[str]) -> Iterator[tuple[str, int, Atoms]]:
    """(file, index, atoms) for every structure of every file matched by the patterns."""
    files: list[str] = []
    for p in patterns:
        matched = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matched:
            raise DataError(f"no file matches {p!r}")
        files.extend(matched)
    for path in files:
        if not Path(path).exists():
            raise DataError(f"input file {path} does not exist")
        try:
            for index, atoms in enumerate(ase.io.iread(path, index=":")):
                yield path, index, atoms
        except DataError:
            raise
        except Exception as e:  # ASE raises many types for unreadable files
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def preprocess(
    inputs: list[str],
    out_dir: str | Path,
    shard_size: int = 10000,
    cutoff: float | None = None,
    skip_invalid: bool = False,
    min_distance: float = 0.5,
    progress: bool = True,
) -> dict:
    """Convert ASE-readable inputs into a sharded dataset; return its manifest."""
    skipped: list[str] = []
    writer = ShardWriter(out_dir, shard_size=shard_size, cutoff=cutoff)
    bar = tqdm(desc="preprocess", unit=" structures", disable=not progress)
    for path, index, atoms in iter_inputs(inputs):
        try:
            s = to_structure(atoms, min_distance=min_distance)
        except DataError as e:
            where = f"{path} record {index}: {e}"
            if not skip_invalid:
                raise DataError(f"{where} (use --skip-invalid to drop bad records)") from e
            skipped.append(where)
            continue
        writer.add(s)
        bar.update()
    bar.close()
    writer.metadata = {"sources": inputs, "skipped": len(skipped)}
    manifest = writer.close()
    for line in skipped[:20]:
        print(f"skipped: {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more skipped records", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Validate ASE-readable structures (extxyz, ASE db, ...) and write them "
        "as HDF5 shards plus a dataset.json manifest with per-element reference energies.",
    )
    p.add_argument("inputs", nargs="+", help="input files or glob patterns (quote globs)")
    p.add_argument("-o", "--out", required=True, help="output folder (must not hold a dataset)")
    p.add_argument("--shard-size", type=int, default=10000, help="structures per shard")
    p.add_argument(
        "--cutoff",
        type=float,
        default=None,
        help="also store edge counts for this cutoff (Å), enabling edge-budget batching",
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="drop and count bad records instead of failing"
    )
    p.add_argument(
        "--min-distance", type=float, default=0.5, help="reject atoms closer than this (Å)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        m = preprocess(
            args.inputs,
            args.out,
            shard_size=args.shard_size,
            cutoff=args.cutoff,
            skip_invalid=args.skip_invalid,
            min_distance=args.min_distance,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {m['n_structures']} structures ({m['n_atoms']} atoms) in {len(m['shards'])} "
        f"shard(s) to {args.out}; skipped {m['skipped']}; elements {m['elements']}"
    )
    return 0
