#!/usr/bin/env python
"""MD steps per second through the AOTInductor package against the eager checkpoint
calculator, in one process on the same structure: NVE velocity Verlet on a rattled fcc
Cu-Au cell, both in fp64, blocks of steps alternating between the two (so that drift in the
machine's speed hits both), the median block per calculator reported.

    python benchmarks/package_md.py --families schnet painn egnn irrep --atoms 108 \\
        --out benchmarks/results/package-md-cpu

Models are the families' 100k sizes with random weights and Cu/Au statistics (speed does
not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"schnet": "schnet-100k", "painn": "mgnn-100k", "egnn": "egnn-100k", "irrep": "irrep-100k"}


def structure(atoms: int):
    from ase.build import bulk

    reps = max(1, round((atoms / 4) ** (1 / 3)))
    cell = bulk("Cu", "fcc", a=3.7, cubic=True) * (reps, reps, reps)
    cell.numbers[::4] = 79
    cell.rattle(0.05, seed=0)
    return cell


def steps_per_s(calc, atoms, steps: int) -> tuple[float, float]:
    """(steps per second over ``steps`` velocity-Verlet steps, final total energy)."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    start = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - start), atoms.get_total_energy()


def run_family(family: str, args) -> dict:
    import numpy as np
    import torch
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from megagnn.config import load_config
    from megagnn.inference.calculator import MegaGNNCalculator
    from megagnn.inference.package import export_package
    from megagnn.models import build_model

    cfg = load_config(str(ROOT / "configs" / "model" / f"{SIZES[family]}.yaml"), []).model
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    model.set_statistics(0, {29: -3.7, 79: -3.2}, 0.3, 40.0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_package(model, Path(tmp) / "model.pt2", dtype=torch.float64)
        build_s = time.perf_counter() - start
        calcs = {"eager": MegaGNNCalculator(model), "package": MegaGNNCalculator(str(path))}
        base = structure(args.atoms)
        MaxwellBoltzmannDistribution(base, temperature_K=300, rng=np.random.default_rng(0))
        check = {name: c.get_potential_energy(base.copy()) for name, c in calcs.items()}
        rates: dict[str, list[float]] = {name: [] for name in calcs}
        for _ in range(args.repeats):
            for name, calc in calcs.items():
                atoms = base.copy()
                rates[name].append(steps_per_s(calc, atoms, args.steps)[0])
    eager, package = statistics.median(rates["eager"]), statistics.median(rates["package"])
    return {
        "family": family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "atoms": len(base),
        "eager_steps_per_s": eager,
        "package_steps_per_s": package,
        "speedup": package / eager,
        "package_build_s": build_s,
        "energy_difference_ev": abs(check["eager"] - check["package"]),
        "eager_blocks": rates["eager"],
        "package_blocks": rates["package"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(SIZES))
    p.add_argument("--atoms", type=int, default=108)
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--repeats", type=int, default=3, help="blocks per calculator")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for family in args.families:
        rows.append(run_family(family, args))
        r = rows[-1]
        print(
            f"{family}: eager {r['eager_steps_per_s']:.2f} steps/s, package "
            f"{r['package_steps_per_s']:.2f} steps/s ({r['speedup']:.2f}x), "
            f"|ΔE| {r['energy_difference_ev']:.2e} eV",
            flush=True,
        )
    lines = [
        "| family | parameters | atoms | eager steps/s | package steps/s | package / eager "
        "| build s | energy difference eV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['parameters']:,} | {r['atoms']} | {r['eager_steps_per_s']:.2f} "
            f"| {r['package_steps_per_s']:.2f} | {r['speedup']:.2f}x | {r['package_build_s']:.0f} "
            f"| {r['energy_difference_ev']:.1e} |"
        )
    if args.out:
        device = f"cpu, {args.threads} threads, fp64"
        write_results(args.out, __file__, argv, device, {"rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
