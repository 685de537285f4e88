#!/usr/bin/env python
"""Batched inference through torch-sim against one structure at a time through ASE, in one
run on the same model and structures: energy, forces and stress of N periodic cells.

    python benchmarks/torch_sim_batch.py --systems 100 --atoms 32 \\
        --out benchmarks/results/torch-sim-batch-cpu

The model is mgnn-100k (configs/model/mgnn-100k.yaml, 5 Å cutoff, random weights with Cu
and Au statistics: the time does not depend on training), fp64. Each way is timed --repeat
times after one warm-up call; the table gives the median and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from ase.build import bulk
from results_io import write_results  # benchmarks/, the scripts' own folder

from megagnn.config import load_config
from megagnn.inference.calculator import MegaGNNCalculator
from megagnn.inference.torch_sim import MegaGNNModel
from megagnn.models import build_model


def structures(count: int, atoms: int) -> list:
    reps = max(1, round((atoms / 4) ** (1 / 3)))
    out = []
    for k in range(count):
        cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
        cell.numbers[k % len(cell) :: 5] = 79
        cell.rattle(0.05, seed=k)
        out.append(cell)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch_sim as ts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", type=int, default=100)
    p.add_argument("--atoms", type=int, default=32, help="atoms per cell (fcc cubes)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/torch-sim-batch-cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config("configs/model/mgnn-100k.yaml", ["model.cutoff=5.0"]).model
    model = build_model(cfg).double().eval()
    model.set_statistics(0, {29: -3.5, 79: -2.0}, 0.5, 40.0)
    cells = structures(args.systems, args.atoms)
    cpu = torch.device("cpu")
    wrapped = MegaGNNModel(model, cpu)
    state = ts.io.atoms_to_state(cells, cpu, torch.float64)
    calc = MegaGNNCalculator(model)

    def batched():
        return wrapped(state)

    def one_by_one():
        for atoms in cells:
            calc.calculate(atoms, ["energy", "forces", "stress"])

    times = {}
    for name, fn in (("torch-sim batch", batched), ("ASE one by one", one_by_one)):
        fn()
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    ratio = times["ASE one by one"] / times["torch-sim batch"]
    n_atoms = len(cells[0])
    rows = [{"way": k, "seconds": v, "systems_per_s": args.systems / v} for k, v in times.items()]
    table = "\n".join(
        ["| way | seconds per pass | systems/s |", "|---|---:|---:|"]
        + [f"| {r['way']} | {r['seconds']:.3f} | {r['systems_per_s']:.1f} |" for r in rows]
        + [
            "",
            f"{args.systems} cells of {n_atoms} atoms: one by one through ASE takes "
            f"{1 / ratio:.2f}x the time of the batch.",
        ]
    )
    write_results(
        args.out,
        __file__,
        argv,
        f"{os.cpu_count()}-core x86-64 CPU, {torch.get_num_threads()} threads",
        {"rows": rows, "speedup": ratio, "systems": args.systems, "atoms": n_atoms},
        table,
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
