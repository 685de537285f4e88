#!/usr/bin/env python
"""Relax a structure's positions and (for periodic cells) its cell with a trained model.

The cell relaxes through ASE's FrechetCellFilter (log-space deformation gradient: the
optimiser sees forces and stress on one footing) towards a target pressure. Prints the final
energy, lattice (lengths and angles), volume, pressure and largest force. The structure is
an ASE-readable file, or a held-out structure of the run's test split; the model is the
run's checkpoint, or --model: a consolidated folder or an inference package (.pt2).

    python examples/relax.py --run runs/quickstart --fmax 0.01 --out relaxed.extxyz
"""

import ase.io
import numpy as np
from ase import units
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from md import simulation_parser, starting_structure

from megagnn.inference import MegaGNNCalculator


def main() -> None:
    p = simulation_parser(__doc__)
    p.add_argument("--fmax", type=float, default=0.01, help="force tolerance (eV/Å)")
    p.add_argument("--steps", type=int, default=500, help="most optimiser steps")
    p.add_argument("--pressure", type=float, default=0.0, help="target pressure (GPa)")
    p.add_argument("--fixed-cell", action="store_true", help="relax the positions only")
    p.add_argument("--out", help="write the relaxed structure to this file")
    args = p.parse_args()

    atoms = starting_structure(args)
    atoms.calc = MegaGNNCalculator(args.model or args.run)
    periodic = bool(atoms.pbc.all())
    start = atoms.get_potential_energy()
    if periodic and not args.fixed_cell:
        target = FrechetCellFilter(atoms, scalar_pressure=args.pressure * units.GPa)
    else:
        target = atoms  # a molecule or slab, or positions only: no cell degrees of freedom
    converged = FIRE(target, logfile=None).run(fmax=args.fmax, steps=args.steps)

    energy = atoms.get_potential_energy()
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    print(f"{atoms.get_chemical_formula()}: {'converged' if converged else 'NOT converged'}")
    change = (energy - start) / len(atoms)
    print(f"  energy      {start:.6f} -> {energy:.6f} eV ({change:+.5f} eV/atom)")
    print(f"  max force   {fmax:.4f} eV/Å (fmax {args.fmax})")
    if periodic:
        a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
        pressure = -np.trace(atoms.get_stress(voigt=False)) / 3 / units.GPa
        print(f"  lattice     a {a:.4f}  b {b:.4f}  c {c:.4f} Å")
        print(f"              alpha {alpha:.2f}  beta {beta:.2f}  gamma {gamma:.2f} deg")
        volume = atoms.get_volume()
        print(f"  volume      {volume:.3f} Å^3 ({volume / len(atoms):.3f} per atom)")
        print(f"  pressure    {pressure:.4f} GPa (target {args.pressure})")
    if args.out:
        atoms.calc = None  # keep the structure, not a calculator reference
        ase.io.write(args.out, atoms)
        print(f"  written to  {args.out}")


if __name__ == "__main__":
    main()
