#!/usr/bin/env python
"""Write a run's train/val/test split as extxyz files, labels under REF_energy, REF_forces
and REF_stress (MACE's keys): other codes (a MACE baseline, say) then train and test on
exactly the structures megagnn did.

    python tools/export_split.py runs/quickstart -o exports/quickstart
    # -> exports/quickstart/{train,val,test}.extxyz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from tqdm import tqdm

from megagnn.checkpoint import open_saved
from megagnn.data.shards import ShardedDataset
from megagnn.training.sources import SPLIT_NAMES, dataset_entries, read_splits, recorded_run


def record_atoms(rec: dict) -> Atoms:
    """One shard record as ASE Atoms with its labels (absent ones left out)."""
    atoms = Atoms(
        numbers=rec["atomic_numbers"], positions=rec["positions"], cell=rec["cell"], pbc=rec["pbc"]
    )
    if np.isfinite(rec["energy"]):
        atoms.info["REF_energy"] = float(rec["energy"])
    forces = rec.get("forces")
    if forces is not None and np.isfinite(forces).all():
        atoms.arrays["REF_forces"] = np.asarray(forces, dtype=np.float64)
    stress = rec.get("stress")
    if stress is not None and np.isfinite(stress).all():
        atoms.info["REF_stress"] = np.asarray(stress, dtype=np.float64).reshape(3, 3)
    return atoms


def export(run: str | Path, out_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """The run's (first dataset's) split as ``out_dir/<split>.extxyz``; returns the paths."""
    cfg = open_saved(run).config
    path, head, _ = dataset_entries(cfg)[0]
    folder = recorded_run(run)
    splits = read_splits(folder, cfg.model.heads[head] if len(dataset_entries(cfg)) > 1 else None)
    if splits is None:
        raise SystemExit(f"{run} records no split (splits.npz)")
    data = ShardedDataset(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in SPLIT_NAMES:
        frames = [
            record_atoms(data[int(i)])
            for i in tqdm(splits[name], desc=name, disable=not progress, leave=False)
        ]
        target = out_dir / f"{name}.extxyz"
        tmp = target.with_name(target.name + ".tmp")
        ase.io.write(tmp, frames, format="extxyz")
        tmp.replace(target)  # a file that exists is complete
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run, checkpoint or consolidated folder (its recorded split)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for name, target in export(args.run, args.out, progress=not args.no_progress).items():
        print(f"{name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
