#!/usr/bin/env python
"""The QM9 U0 scaling grid: per family, model widths x nested training subsets of 1k to 110k
molecules, energy only, under μP (configs/scaling/qm9-cpu.yaml), each point an ordinary run
of `tools/scaling_laws.py sweep` whose finished records land in
benchmarks/results/scaling-qm9-rows/<family>/ (so the study resumes from committed results).

    python benchmarks/scaling_qm9.py --families painn egnn irrep --jobs 2
    python benchmarks/scaling_qm9.py --families painn --fit   # the fits of what has landed

Protocol: a point with D training molecules trains for E(D) = E_max_d (D_max / D)^gamma
epochs (default 3 epochs at 110k, 31 at 1k: gamma = 0.5) on a cosine schedule and is
evaluated on the whole validation split at its end. The small subsets run to convergence,
the largest is compute-bound; `--check` adds the points that say which (twice the epochs,
and a second seed). The compute axis (`--budgets 1e12 3e12 1e13`) trains every width on the
full training split for a fixed number of FLOPs each: the IsoFLOP profiles whose minima make
the compute-optimal frontier. Their records land beside the grid's (the fit tells them
apart by their budget).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1000, 3000, 10000, 30000, 110000]  # training molecules (nested subsets)
D_MAX = 110000
# widths per family: at least 1.5 decades of parameters each (H..F embedding, 3 blocks):
# PaiNN 15.5k-593k, EGNN 24k-1.25M, IrrepNet (lmax 2, correlation 2) 17k-623k, SchNet
# 15k-654k
WIDTHS = {
    "painn": [16, 32, 64, 128],
    "egnn": [32, 64, 128, 256],
    "irrep": [8, 24, 64, 128],
    "schnet": [32, 64, 128, 256],
}
FAMILY_SETS = {"irrep": ["model.lmax=2", "model.correlation=2"]}


def epochs(size: int, top: float, gamma: float) -> float:
    return round(top * (D_MAX / size) ** gamma, 1)


def sweep(family: str, size: int, args, extra: list[str], tag: str = "") -> int:
    fraction = size / D_MAX
    e = epochs(size, args.epochs, args.gamma) * (2 if "long" in tag else 1)
    steps = e * size / 28  # about 28 molecules per 512-atom batch
    sets = [
        f"train.epochs={e}",
        f"validate.every={max(50, int(steps / 8))}",
        "train.compile=true",
        *FAMILY_SETS.get(family, []),
        *extra,
        *args.set,
    ]
    models = [f"model.family={family},model.hidden={w}" for w in args.widths or WIDTHS[family]]
    name = f"{family}{tag}"
    cmd = [sys.executable, "tools/scaling_laws.py", "sweep", "--config", args.config]
    cmd += ["--models", *models, "--fractions", f"{fraction:.6g}", "--jobs", str(args.jobs)]
    cmd += ["--out", f"{args.work}/{name}", "--keep", f"{args.rows}/{name}", "--set", *sets]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def isoflop(family: str, budget: float, args) -> int:
    """The IsoFLOP profile of one budget: each width trains on the full training split for
    ``budget`` FLOPs (forward and backward, counted per atom), the schedule spanning it."""
    sets = ["validate.every=250", "train.compile=true", *FAMILY_SETS.get(family, [])]
    widths = args.widths or WIDTHS[family]
    models = [f"model.family={family},model.hidden={w}" for w in widths]
    name = f"{family}-isoflop"
    cmd = [sys.executable, "tools/scaling_laws.py", "sweep", "--config", args.config]
    cmd += ["--models", *models, "--fractions", "1", "--budgets", f"{budget:g}"]
    cmd += ["--jobs", str(args.jobs), "--out", f"{args.work}/{name}"]
    cmd += ["--keep", f"{args.rows}/{family}", "--set", *sets, *args.set]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["painn", "egnn", "irrep"])
    p.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="training molecules")
    p.add_argument("--widths", nargs="+", type=int, help="model.hidden values (default per family)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs at 110k molecules")
    p.add_argument("--gamma", type=float, default=0.5, help="epochs grow as (110k/D)^gamma")
    p.add_argument("--config", default="configs/scaling/qm9-cpu.yaml")
    p.add_argument("--jobs", type=int, default=2, help="points at once, one thread each")
    p.add_argument("--check", choices=["long", "seed"], help="the convergence points instead")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every point")
    p.add_argument("--work", default="runs/scaling-qm9", help="the points' run folders")
    p.add_argument("--rows", default="benchmarks/results/scaling-qm9-rows")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        help="FLOPs: the IsoFLOP profiles (every width, full data) instead of the grid",
    )
    p.add_argument("--fit", action="store_true", help="fit what has landed, per family")
    args = p.parse_args(argv)
    if args.fit:
        for family in args.families:
            cmd = [sys.executable, "tools/scaling_laws.py", "fit", f"{args.rows}/{family}"]
            cmd += ["--results", f"benchmarks/results/scaling-qm9-{family}-cpu"]
            subprocess.call(cmd, cwd=ROOT)
        return 0
    failed = 0
    for family in args.families:
        for budget in args.budgets or []:
            failed |= isoflop(family, budget, args)
        for size in [] if args.budgets else args.sizes:
            if args.check == "long":
                failed |= sweep(family, size, args, [], tag="-long")
            elif args.check == "seed":
                failed |= sweep(family, size, args, ["train.seed=1"], tag="-seed1")
            else:
                failed |= sweep(family, size, args, [])
    return failed


if __name__ == "__main__":
    sys.exit(main())
