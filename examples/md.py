#!/usr/bin/env python
"""NVE molecular dynamics with a trained model through its ASE calculator.

Starts from a held-out structure of the run's dataset (or any ASE-readable file), prints
the total energy along the trajectory and its drift in meV/atom/ps. The model is the run's
latest checkpoint, or ``--model``: a consolidated folder or an inference package (.pt2).
"""

import argparse

import ase.io
import numpy as np
from ase import Atoms, units
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from megagnn.inference import MegaGNNCalculator


def held_out_structure(run: str) -> Atoms:
    from megagnn.config import config_from_dict
    from megagnn.data.shards import ShardedDataset
    from megagnn.training.checkpoint import read_common
    from megagnn.training.sources import read_splits

    cfg = config_from_dict(read_common(run)["config"])
    data = ShardedDataset(cfg.data.path)
    splits = read_splits(run)
    if splits is None or not len(splits["test"]):
        raise SystemExit(f"{run} records no test split (splits.npz); pass --structure")
    rec = data[int(splits["test"][0])]
    return Atoms(
        numbers=rec["atomic_numbers"], positions=rec["positions"], cell=rec["cell"], pbc=rec["pbc"]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True, help="run folder or checkpoint file")
    p.add_argument("--model", help="checkpoint, consolidated folder or .pt2 (default: --run)")
    p.add_argument("--structure", help="ASE-readable file (default: a held-out structure)")
    p.add_argument("--steps", type=int, default=200, help="MD steps")
    p.add_argument("--dt", type=float, default=1.0, help="time step in fs")
    p.add_argument("--temperature", type=float, default=300.0, help="initial temperature (K)")
    args = p.parse_args()

    atoms = ase.io.read(args.structure) if args.structure else held_out_structure(args.run)
    atoms.calc = MegaGNNCalculator(args.model or args.run)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, args.dt * units.fs)
    energies = []

    def record() -> None:
        energies.append(atoms.get_total_energy())
        if len(energies) % 50 == 1:
            print(
                f"step {len(energies) - 1:5d}  E_tot {energies[-1]:.6f} eV  "
                f"T {atoms.get_temperature():.0f} K"
            )

    dyn.attach(record, interval=1)
    dyn.run(args.steps)
    t_ps = np.arange(len(energies)) * args.dt / 1000
    slope = np.polyfit(t_ps, np.array(energies) / len(atoms), 1)[0]
    spread = (max(energies) - min(energies)) / len(atoms)
    print(
        f"NVE {args.steps} steps of {args.dt} fs on {atoms.get_chemical_formula()}: "
        f"drift {1000 * slope:.3f} meV/atom/ps, max-min {1000 * spread:.3f} meV/atom"
    )


if __name__ == "__main__":
    main()
