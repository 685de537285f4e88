#!/usr/bin/env python
"""Does the best learning rate transfer across widths? A learning-rate sweep at two or more
widths under the standard parametrisation and under μP (model.parametrization=mup, base
width = the smallest width), same data, same steps.

    python benchmarks/mup_transfer.py --data data/emt/processed --widths 16 128 \\
        --lrs 1e-3 3e-3 1e-2 3e-2 1e-1 --steps 200 --out benchmarks/results/mup-transfer-emt-cpu

Each point is an ordinary pretraining run (--config, default the quickstart's) evaluated on
the validation split with the training loss; the table gives every point, the best learning
rate per (parametrisation, width), and the plot the loss against the learning rate. Under
μP the best learning rate should not move with the width; under the standard one it
usually falls as the width grows. Points run --jobs at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent


def run_point(args, parametrization: str, width: int, lr: float, folder: Path) -> dict:
    run = folder / f"{parametrization}-w{width}-lr{lr:g}"
    sets = [f"data.path={args.data}", f"train.out_dir={run}", f"model.hidden={width}"]
    sets += [f"model.parametrization={parametrization}", f"model.mup_base_width={min(args.widths)}"]
    sets += [f"optim.lr={lr}", f"train.max_steps={args.steps}", f"validate.every={args.steps}"]
    sets += ["train.progress=false", f"checkpoint.every={args.steps}", *args.set]
    cmd = [sys.executable, "-m", "megagnn.pretrain", "--config", args.config, "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    row = {"parametrization": parametrization, "width": width, "lr": lr}
    if _final_validation(run, args.steps) is None:  # a finished point is not rerun
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            return {**row, "error": proc.stderr[-500:]}
    val = _final_validation(run, args.steps)
    return {
        **row,
        "val_loss": val["val/loss"],
        "val_forces_mae": val.get("val/forces_mae"),
        "val_energy_mae": val.get("val/energy_mae"),
    }


def _final_validation(run: Path, steps: int) -> dict | None:
    """The validation record of the run's last step, if it got there."""
    if not (run / "metrics.jsonl").is_file():
        return None
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/loss" in r and r["step"] >= steps]
    return val[-1] if val else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, param in zip(axes, ("sp", "mup"), strict=True):
        for width in sorted({r["width"] for r in rows}):
            sel = sorted(
                (
                    r
                    for r in rows
                    if r["parametrization"] == param and r["width"] == width and "val_loss" in r
                ),
                key=lambda r: r["lr"],
            )
            ax.loglog(
                [r["lr"] for r in sel], [r["val_loss"] for r in sel], "o-", label=f"width {width}"
            )
        ax.set_title({"sp": "standard parametrisation", "mup": "μP"}[param])
        ax.set_xlabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="preprocessed dataset")
    p.add_argument("--config", default="configs/quickstart.yaml", help="base pretraining config")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 128], help="model.hidden values")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--steps", type=int, default=200, help="training steps per point")
    p.add_argument("--jobs", type=int, default=2, help="points trained at once")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every point")
    p.add_argument("--work", default="runs/mup-transfer", help="folder of the point runs")
    p.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)

    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    points = [(pa, w, lr) for pa in ("sp", "mup") for w in args.widths for lr in args.lrs]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda pt: run_point(args, *pt, folder), points))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['parametrization']} width {r['width']} lr {r['lr']}: {r['error']}")
    lines = [
        "| parametrisation | width | lr | val loss | val energy MAE eV | val force MAE eV/Å |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['parametrization']} | {r['width']} | {r['lr']:g} | {r['val_loss']:.4g} "
        f"| {_fmt(r['val_energy_mae'])} | {_fmt(r['val_forces_mae'])} |"
        for r in rows
        if "val_loss" in r
    ]
    lines += ["", "| parametrisation | width | best lr | its val loss |", "|---|---|---|---|"]
    best = {}
    for param in ("sp", "mup"):
        for width in args.widths:
            sel = [
                r
                for r in rows
                if r["parametrization"] == param and r["width"] == width and "val_loss" in r
            ]
            if sel:
                b = min(sel, key=lambda r: r["val_loss"])
                best[f"{param}-{width}"] = b["lr"]
                lines.append(f"| {param} | {width} | {b['lr']:g} | {b['val_loss']:.4g} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        doc = {"rows": rows, "best": best}
        out = write_results(args.out, __file__, argv, "cpu, one thread per point", doc, text)
        plot(rows, out.with_suffix(".png"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
