#!/usr/bin/env python
"""Molecular dynamics in LAMMPS with a trained megagnn model (fix external).

Writes a held-out periodic structure of the run's test split (or --structure, repeated
--repeat times per cell vector) as a LAMMPS data file, then runs LAMMPS on it: velocities
at --temperature, Nosé-Hoover NVT (or NVE with --nve), thermo output every --every steps.
Any LAMMPS input can be used the same way: see megagnn.inference.lammps.

    python examples/lammps_md.py --run runs/quickstart --steps 1000 --temperature 600
"""

import tempfile
from pathlib import Path

import ase.io
import numpy as np
from md import simulation_parser, starting_structure

from megagnn.inference.lammps import MegaGNNFix, start_lammps


def main() -> None:
    p = simulation_parser(__doc__)
    p.add_argument("--repeat", type=int, default=1, help="supercell repeats per cell vector")
    p.add_argument("--steps", type=int, default=1000, help="MD steps")
    p.add_argument("--dt", type=float, default=1.0, help="time step (fs)")
    p.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    p.add_argument("--nve", action="store_true", help="NVE instead of Nosé-Hoover NVT")
    p.add_argument("--every", type=int, default=100, help="thermo output interval")
    args = p.parse_args()

    atoms = starting_structure(args)
    atoms = atoms.repeat((args.repeat,) * 3)
    species = sorted(set(atoms.get_chemical_symbols()))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "structure.lmp"
        ase.io.write(data, atoms, format="lammps-data", specorder=species, masses=True)
        lmp = start_lammps("-log", "none")  # thermo output on the screen
        for line in ("units metal", "atom_style atomic", f"read_data {data}"):
            lmp.command(line)
    lmp.command("pair_style zero 1.0")  # forces come from the model; no LAMMPS potential
    lmp.command("pair_coeff * *")
    MegaGNNFix(lmp, args.model or args.run, elements=species)
    seed = int(np.random.default_rng(0).integers(1, 2**31 - 1))
    lmp.command(f"velocity all create {args.temperature} {seed} mom yes dist gaussian")
    lmp.command(f"timestep {args.dt / 1000}")  # ps
    damp = 100 * args.dt / 1000
    ensemble = "nve" if args.nve else f"nvt temp {args.temperature} {args.temperature} {damp}"
    lmp.command(f"fix md all {ensemble}")
    lmp.command("thermo_style custom step temp pe etotal press vol")
    lmp.command(f"thermo {args.every}")
    lmp.command(f"run {args.steps}")
    kind = "NVE" if args.nve else "NVT"
    print(f"LAMMPS {kind} {args.steps} steps on {atoms.get_chemical_formula()}")


if __name__ == "__main__":
    main()
