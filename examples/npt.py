#!/usr/bin/env python
"""NPT molecular dynamics of a periodic structure with a trained model.

Isotropic Martyna-Tobias-Klein dynamics (ASE's IsotropicMTKNPT: Nosé-Hoover chains for
the temperature and the cell volume), which sample the isothermal-isobaric ensemble
exactly. Prints temperature, pressure and volume along the run and their means over its
second half. The structure is an ASE-readable file, or a held-out periodic structure of the
run's test split, repeated --repeat times along each cell vector.

    python examples/npt.py --run runs/quickstart --temperature 600 --pressure 0 --steps 2000
"""

import numpy as np
from ase import units
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from md import simulation_parser, starting_structure

from megagnn.inference import MegaGNNCalculator


def main() -> None:
    p = simulation_parser(__doc__)
    p.add_argument("--repeat", type=int, default=1, help="supercell repeats per cell vector")
    p.add_argument("--steps", type=int, default=1000, help="MD steps")
    p.add_argument("--dt", type=float, default=2.0, help="time step (fs)")
    p.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    p.add_argument("--pressure", type=float, default=0.0, help="pressure (GPa)")
    p.add_argument("--tdamp", type=float, default=100.0, help="thermostat time (steps)")
    p.add_argument("--pdamp", type=float, default=1000.0, help="barostat time (steps)")
    p.add_argument("--every", type=int, default=50, help="print every this many steps")
    args = p.parse_args()

    atoms = starting_structure(args)
    if not atoms.pbc.all():
        raise SystemExit("NPT needs a cell periodic in all three directions")
    atoms = atoms.repeat((args.repeat,) * 3)
    atoms.calc = MegaGNNCalculator(args.model or args.run)
    MaxwellBoltzmannDistribution(
        atoms, temperature_K=args.temperature, rng=np.random.default_rng(0)
    )
    Stationary(atoms)
    dt = args.dt * units.fs
    dyn = IsotropicMTKNPT(
        atoms,
        timestep=dt,
        temperature_K=args.temperature,
        pressure_au=args.pressure * units.GPa,
        tdamp=args.tdamp * dt,
        pdamp=args.pdamp * dt,
    )
    rows = []

    def record() -> None:
        pressure = -np.trace(atoms.get_stress(voigt=False, include_ideal_gas=True)) / 3
        rows.append((atoms.get_temperature(), pressure / units.GPa, atoms.get_volume()))
        if (len(rows) - 1) % args.every == 0:
            t, pr, v = rows[-1]
            print(f"step {len(rows) - 1:6d}  T {t:7.1f} K  P {pr:8.3f} GPa  V {v:10.3f} Å^3")

    dyn.attach(record, interval=1)
    dyn.run(args.steps)
    t, pr, v = np.array(rows[len(rows) // 2 :]).mean(axis=0)
    print(
        f"NPT {args.steps} steps of {args.dt} fs on {atoms.get_chemical_formula()} "
        f"at {args.temperature} K, {args.pressure} GPa; second half: <T> {t:.1f} K, "
        f"<P> {pr:.3f} GPa, <V> {v:.3f} Å^3 ({v / len(atoms):.3f} per atom)"
    )


if __name__ == "__main__":
    main()
