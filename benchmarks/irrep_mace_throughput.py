#!/usr/bin/env python
"""IrrepNet against MACE: training structures per second at equal parameters, on the same
structures, in one run, one thread per process.

    python benchmarks/irrep_mace_throughput.py --sizes 100k 1m \\
        --mace-python .venv-mace/bin/python --out benchmarks/results/irrep-mace-throughput-cpu

mace-torch lives in its own environment (it pins e3nn 0.4; see benchmarks/mace_baseline.py):

    python -m venv .venv-mace && .venv-mace/bin/pip install torch==2.13.0 mace-torch==0.3.16

Per size: IrrepNet (configs/model/irrep-SIZE.yaml: degrees up to 2, the second-order
product) steps through the first batches of the EMT set eagerly and compiled
(train.compile, benchmarks/compile_step.py's worker); then MACE (its defaults: hidden
degrees up to 1, Y up to 3, correlation 3, two interactions), with the channels whose
parameter count is nearest, steps through batches of the same structures of about the same
atom count. Both: conservative forces and stress, fp32, the training loop's loss, clipping
and optimizer; the median step after a warm-up (IrrepNet's first step compiles).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from compile_step import DEVICE, ENV, ROOT, eager_and_compiled, ensure_data
from results_io import write_results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", nargs="+", default=["100k", "1m"], help="IrrepNet sizes")
    p.add_argument("--mace-python", required=True, help="python of the mace-torch environment")
    p.add_argument("--structures", type=int, default=400, help="structures in the EMT set")
    p.add_argument("--max-atoms", type=int, default=256, help="atoms per batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the first)")
    p.add_argument("--work", default="runs/compile-bench", help="data and scratch folder")
    p.add_argument("--out", help="results stem: OUT.json and OUT.md")
    return p.parse_args(argv)


def mace_row(args, structures: Path, parameters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mace.json"
        cmd = [args.mace_python, str(ROOT / "benchmarks/mace_baseline.py")]
        cmd += ["--step-time", str(structures), "--target-parameters", str(parameters)]
        cmd += ["--max-atoms", str(args.max_atoms), "--steps", str(args.steps)]
        subprocess.run([*cmd, "--threads", "1", "--out", str(out)], check=True, env=ENV)
        return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    lines = [
        "| IrrepNet | parameters (IrrepNet / MACE) | MACE channels | IrrepNet eager / compiled "
        "(structures/s) | MACE (structures/s) | compiled / MACE | eager / MACE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mace = r["mace_structures_per_s"]
        lines.append(
            f"| {r['size']} | {r['parameters']:,} / {r['mace_parameters']:,} | "
            f"{r['mace_channels']} | {r['irrep_eager_structures_per_s']:.2f} / "
            f"{r['irrep_structures_per_s']:.2f} | {mace:.2f} | "
            f"{r['irrep_structures_per_s'] / mace:.2f}x | "
            f"{r['irrep_eager_structures_per_s'] / mace:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = ROOT / args.work
    data = ensure_data("emt", work, args.structures)
    rows = []
    for size in args.sizes:
        eager, compiled = eager_and_compiled(data, f"irrep-{size}", args.max_atoms, args.steps)
        mace = mace_row(args, work / "emt" / "raw.extxyz", eager["parameters"])
        row = {
            "size": size,
            "parameters": eager["parameters"],
            "irrep_structures_per_s": compiled["structures_per_step"] / compiled["median_step_s"],
            "irrep_eager_structures_per_s": eager["structures_per_step"] / eager["median_step_s"],
            "irrep_atoms_per_step": eager["atoms_per_step"],
            "irrep_compile_s": compiled["compile_s"],
            "mace_parameters": mace["parameters"],
            "mace_channels": mace["channels"],
            "mace_structures_per_s": mace["structures_per_s"],
            "mace_atoms_per_step": mace["atoms_per_step"],
            "mace_step_s": mace["step_time_s"],
        }
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    if args.out:
        write_results(
            args.out,
            __file__,
            argv,
            DEVICE,
            {"rows": rows},
            table(rows),
            protocol="EMT cells (tools/generate_emt_data.py), conservative forces and stress, "
            f"fp32, batches of about {args.max_atoms} atoms, the median of {args.steps} "
            "steps after the first; MACE eager (mace-torch's training as it ships)",
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
