"""Fine-tuning vs training from scratch, for the same steps: test MAEs and validation curves.

Three runs on the same data and split, started one after the other in the background or
side by side (the comparison is per step, so shared cores change nothing but wall time):

    python -m megagnn.pretrain --config configs/quickstart.yaml --set train.out_dir=R/pretrain
    python -m megagnn.pretrain --config configs/finetune-xtb.yaml --set train.out_dir=R/scratch
    python -m megagnn.pretrain --config configs/finetune-xtb.yaml \\
        --set train.out_dir=R/finetune finetune.init_from=R/pretrain
    python -m megagnn.pretrain --config configs/finetune-xtb-replay.yaml \\
        --set train.out_dir=R/replay finetune.init_from=R/pretrain

then ``python benchmarks/finetune.py R --out benchmarks/results/finetune-emt-xtb-cpu``
evaluates each on the test split of the new data (and of the pretraining data: what the
model forgot) and writes a table, the curves (val forces MAE vs step) and a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

RUNS = {"scratch": "from scratch", "finetune": "fine-tuned", "replay": "fine-tuned + replay"}


def evaluate(run: Path, *args: str) -> dict:
    """The run's test metrics (kept beside it: a rerun of the report reuses them)."""
    out = run / "test_metrics.json" if not args else run / "test_metrics_pretraining.json"
    if not out.is_file():
        cmd = [sys.executable, "-m", "megagnn.evaluate", "--run", str(run), "--json", str(out)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run([*cmd, *args], check=True, **quiet)
    return json.loads(out.read_text())


def curve(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder holding pretrain/, scratch/, finetune/, replay/")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--pretraining-data", default="data/emt/processed")
    args = p.parse_args()
    root = Path(args.root)
    results = {}
    for name in RUNS:
        run = root / name
        new = evaluate(run)
        # the pretraining data through the run's first head: what fine-tuning kept of it
        old = evaluate(run, "--data", args.pretraining_data, "--allow-unknown-elements")
        results[name] = {"test": new, "pretraining_test": old}
    results["pretrain"] = {
        "pretraining_test": evaluate(root / "pretrain", "--data", args.pretraining_data)
    }

    def get(metrics: dict, key: str) -> float:
        return metrics.get(key, metrics.get(f"xtb/{key}", float("nan")))

    lines = [
        f"- date: {datetime.date.today()}",
        "- device: cpu (2 cores shared by the three runs)",
        f"- command: benchmarks/finetune.py {args.root} --out {args.out} (runs: module docstring)",
        "",
        "| model | new data: test energy MAE (eV/atom) | forces MAE (eV/Å) | stress MAE "
        "(eV/Å^3) | pretraining data: forces MAE (eV/Å) |",
        "|---|---|---|---|---|",
    ]
    old_pre = results["pretrain"]["pretraining_test"]["forces_mae"]
    lines.append(f"| pretrained (EMT only) | - | - | - | {old_pre:.4f} |")
    for name, label in RUNS.items():
        t, o = results[name]["test"], results[name]["pretraining_test"]
        # replay keeps a head for the pretraining data: its own evaluation of that dataset;
        # the others are read through their one (new) head, forces only (the reference
        # energies are the new data's)
        old = t.get("emt/forces_mae", o["forces_mae"])
        lines.append(
            f"| {label} | {get(t, 'energy_per_atom_mae'):.4f} | {get(t, 'forces_mae'):.4f} | "
            f"{get(t, 'stress_mae'):.5f} | {old:.4f} |"
        )
    key = {n: "val/forces_mae" if n != "replay" else "val/xtb/forces_mae" for n in RUNS}
    curves = {n: curve(root / n, key[n]) for n in RUNS}
    lines += ["", "Validation forces MAE (eV/Å; fixed 300-structure subset) by step:", ""]
    steps = [s for s, _ in curves["scratch"]]
    lines.append("| step | " + " | ".join(RUNS.values()) + " |")
    lines.append("|---|" + "---|" * len(RUNS))
    for step in steps:
        row = [f"{dict(curves[n]).get(step, float('nan')):.4f}" for n in RUNS]
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"results": results, "curves": curves}, indent=1)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, label in RUNS.items():
            ax.plot(*zip(*curves[n], strict=True), marker="o", label=label)
        ax.set(xlabel="step", ylabel="val forces MAE (eV/Å)", yscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
