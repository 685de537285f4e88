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
    from megagnn.checkpoint import open_saved
    from megagnn.data.shards import ShardedDataset
    from megagnn.training.sources import read_splits

    cfg = open_saved(run).config
    data = ShardedDataset(cfg.data.path)
    splits = read_splits(run)
    if splits is None or not len(splits["test"]):
        raise SystemExit(f"{run} records no test split (splits.npz); pass --structure")
    rec = data[int(splits["test"][0])]
    return Atoms(
        numbers=rec["atomic_numbers"], positions=rec["positions"], cell=rec["cell"], pbc=rec["pbc"]
    )


class _Help(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every option with its default."""


def simulation_parser(doc: str) -> argparse.ArgumentParser:
    """The options every simulation example shares: the run, the model, the structure."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--run", required=True, help="run folder or checkpoint folder")
    p.add_argument("--model", help="checkpoint, consolidated folder or .pt2 (default: --run)")
    p.add_argument("--structure", help="ASE-readable file (default: a held-out structure)")
    return p


def starting_structure(args: argparse.Namespace) -> Atoms:
    """--structure, else the first structure of the run's test split."""
    return ase.io.read(args.structure) if args.structure else held_out_structure(args.run)


def main() -> None:
    p = simulation_parser(__doc__)
    p.add_argument("--steps", type=int, default=200, help="MD steps")
    p.add_argument("--dt", type=float, default=1.0, help="time step in fs")
    p.add_argument("--temperature", type=float, default=300.0, help="initial temperature (K)")
    args = p.parse_args()

    atoms = starting_structure(args)
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
