#!/usr/bin/env python
"""Model or recipe variants against each other at an equal number of steps, over seeds:
test energy, force and stress MAE per variant, and their step time in the same run.

    python benchmarks/ablation.py --data data/xtb/processed --steps 250 --seeds 0 1 \\
        --base model.family=irrep model.lmax=2 model.layers=3 model.num_rbf=16 optim.lr=0.01 \\
        --variant c1-h32 model.hidden=32 model.correlation=1 \\
        --variant c2-h28 model.hidden=28 model.correlation=2 \\
        --work runs/ablation-product --out benchmarks/results/irrep-product-xtb-cpu

Each run is `megagnn.pretrain` on --config's recipe with the --base overrides, then the
variant's, train.max_steps=--steps and train.seed=<seed> (the split depends on
data.split_seed only, so every run trains and tests on the same structures), weight average
0.99, then `megagnn.evaluate` on the test split. Every run gets one thread and --jobs run
at once. Equal steps ask which variant learns more per step; the step times say what
that costs. Finished runs are kept in --work and are not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from architectures import parameters, trend  # benchmarks/, the scripts' own folder
from results_io import write_results

from megagnn.training import host_memory

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **host_memory.ENVIRONMENT}
METRICS = (("energy_per_atom_mae", "energy meV/atom"), ("forces_mae", "forces meV/Å"))
METRICS += (("stress_mae", "stress meV/Å^3"),)


def point(args, name: str, overrides: list[str], seed: int) -> dict:
    out = Path(args.work) / f"{name}-seed{seed}"
    metrics = out / "test.json"
    if not metrics.exists():
        sets = [f"data.path={args.data}", f"train.out_dir={out}", f"train.seed={seed}"]
        sets += [f"train.max_steps={args.steps}", "train.progress=false"]
        sets += [f"validate.every={args.eval_every}", "validate.structures=500"]
        sets += ["checkpoint.every=1000000", "optim.ema_decay=0.99", *args.base, *overrides]
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "megagnn.pretrain", "--config", args.config, "--set", *sets]
        with (out / "train.log").open("w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        cmd = [sys.executable, "-m", "megagnn.evaluate", "--run", str(out), "--checkpoint"]
        cmd += ["latest", "--json", str(metrics)]
        with (out / "evaluate.log").open("w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    compute = json.loads((out / "compute.json").read_text())
    history = [
        {"step": m["step"], "forces_mae": m["val/forces_mae"]}
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "val/forces_mae" in m
    ]
    return {
        "variant": name,
        "seed": seed,
        "parameters": parameters(out),
        "steps": compute["step"],
        "step_s": compute["wall_s"] / compute["step"],
        "val_history": history,
        **{k: json.loads(metrics.read_text())[k] for k, _ in METRICS},
    }


def table(rows: list[dict], variants: list[str]) -> str:
    head = "| variant | parameters | seeds | step s (x first) | "
    head += " | ".join(label for _, label in METRICS) + " | val forces, last validations |"
    lines = [head, "|" + "---|" * (5 + len(METRICS))]
    first = np.mean([r["step_s"] for r in rows if r["variant"] == variants[0]])
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        step = np.mean([r["step_s"] for r in mine])
        cells = [name, f"{mine[0]['parameters']:,}", str(len(mine))]
        cells.append(f"{step:.2f} ({step / first:.2f})")
        for key, _ in METRICS:
            values = [1000 * r[key] for r in mine]
            per_seed = " / ".join(f"{v:.1f}" for v in values)
            cells.append(f"{np.mean(values):.1f} ({per_seed})")
        cells.append(" / ".join(trend(r["val_history"]) for r in mine))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="a preprocessed dataset folder")
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"), help="recipe")
    p.add_argument("--base", nargs="*", default=[], help="overrides for every run")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "OVERRIDE"),
        help="a name and its overrides; give --variant once per variant (the first is the "
        "baseline of the step-time ratio)",
    )
    p.add_argument("--steps", type=int, default=250, help="training steps of every run")
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="steps between validations on 500 validation structures (0: none); the table "
        "shows the last three force MAEs, to tell a converged run from an improving one",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--work", default="runs/ablation", help="run folders")
    p.add_argument("--out", required=True, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    variants = {v[0]: v[1:] for v in args.variant}
    if len(variants) != len(args.variant):
        raise SystemExit("--variant names must be distinct")

    jobs = [(name, sets, seed) for seed in args.seeds for name, sets in variants.items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: point(args, *job), jobs))
    text = table(rows, list(variants))
    print(text)
    write_results(
        args.out, __file__, argv, "CPU, one thread per run", {"rows": rows}, text,
        jobs_at_once=args.jobs, dataset=args.data, base=" ".join(args.base),
        variants={k: " ".join(v) for k, v in variants.items()},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
