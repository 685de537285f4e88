#!/usr/bin/env python
"""How much near-duplicate leakage flatters test errors: two runs on the same structures,
one split by group (trajectories kept whole) and one split structure by structure.

    python benchmarks/leakage.py --grouped runs/quickstart --ungrouped runs/qs-ungrouped \\
        --out benchmarks/results/leakage-quickstart-cpu

The ungrouped run trains on the same raw file preprocessed with a --group-key that no record
has (each structure its own group). Both models are evaluated on
- each run's own test split (what each run would report);
- "leaked": structures the ungrouped run tests on although a frame of the same trajectory is
  in its training split, and that the grouped run holds out with their whole group;
- "clean": structures both runs hold out with their whole group.
On the last two subsets both models see the same structures, so their errors compare
directly: the gap on "leaked" is the optimism of a split that ignores groups.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from results_io import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grouped", required=True, help="run folder split by group")
    p.add_argument("--ungrouped", required=True, help="run folder split by structure")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    from megagnn.checkpoint.sharded import read_common
    from megagnn.config import config_from_dict
    from megagnn.inference.calculator import load_model
    from megagnn.training.evaluation import evaluate
    from megagnn.training.sources import DataSplits, read_splits

    runs = {"grouped": args.grouped, "ungrouped": args.ungrouped}
    cfgs = {k: config_from_dict(read_common(v)["config"]) for k, v in runs.items()}
    splits = {k: read_splits(v) for k, v in runs.items()}
    data = {k: DataSplits(cfgs[k], recorded=splits[k]) for k in runs}
    groups = data["grouped"].dataset.groups()  # the true groups (trajectories)
    if len(groups) != len(data["ungrouped"].dataset):
        sys.exit("the two runs' datasets differ in size: preprocess the same raw file twice")
    trained = set(groups[splits["ungrouped"]["train"]].tolist())
    held_out = set(splits["grouped"]["test"].tolist())
    test = splits["ungrouped"]["test"]
    subsets = {
        "own test split": None,
        "leaked": np.array([i for i in test if groups[i] in trained and i in held_out]),
        "clean": np.array([i for i in test if groups[i] not in trained and i in held_out]),
    }
    rows = []
    for name, idx in subsets.items():
        for run, folder in runs.items():
            model = load_model(folder, "cpu", torch.float64)
            chosen = splits[run]["test"] if idx is None else idx
            d = DataSplits(cfgs[run], recorded={**splits[run], "test": chosen})
            m = evaluate(model, d.graphs, d.sampler("test", False), "cpu", torch.float64)
            ratio = m["forces_mae"] / m["baseline_zero_forces_mae"]
            rows.append({"subset": name, "run": run, "structures": len(chosen), **m})
            rows[-1]["force_ratio"] = ratio
            print(f"{name:15s} {run:9s} n={len(chosen):4d} forces {m['forces_mae']:.4f}")
    lines = [
        "| test subset | run | structures | energy MAE eV/atom | force MAE eV/Å "
        "| force MAE / zero-force MAE | stress MAE eV/Å^3 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['subset']} | {r['run']} | {r['structures']} | {r['energy_per_atom_mae']:.4f} "
        f"| {r['forces_mae']:.4f} | {r['force_ratio']:.3f} | {r.get('stress_mae', 0):.5f} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_results(args.out, __file__, argv, "cpu", {"rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
