#!/usr/bin/env python
"""Every megagnn family against MACE at equal wall time and parameters, on the same
leak-free split: test energy, force and stress MAE, parameters, structures/s; then one
longer run per model at the smallest size.

    python benchmarks/architectures.py --data emt=data/emt/processed xtb=data/xtb/processed \\
        --sizes 100k 1m --budget 270 --long-data xtb --long-budget 1200 \\
        --mace-python .venv-mace/bin/python --work runs/architectures \\
        --out benchmarks/results/architectures-cpu

Each point is an ordinary run: `megagnn.pretrain` with the size's config from
configs/model/ (painn is mgnn-<size>) on --config's recipe, train.time_budget=--budget,
weight average 0.99, then `megagnn.evaluate` on the test split; MACE is
benchmarks/mace_baseline.py (its own environment, see there) on the split exported by
tools/export_split.py, with the channel count whose parameter count is nearest the size's
nominal count (1m: 10^6). Every run gets one thread and --jobs run at once, so
each gets the same CPU time; the split of every megagnn run is checked to be the one MACE
trained on. Finished points are kept in --work and are not rerun.

The long runs show where each model ends when trained to convergence: every one validates
along the way (the table gives the last three validations), and --long-budget may give a
model that converges later more time, e.g. `--long-only --long-budget 1500 irrep=4800
mace=3300` (the budget is the end of the time-following schedule, so rows differ in time,
not in recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from llm_techniques import model_overrides  # benchmarks/, the scripts' own folder
from results_io import write_results

from megagnn.training import host_memory

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("schnet", "painn", "egnn", "irrep")
# one thread per run, and the same host allocator for megagnn and MACE (freed activations
# stay in glibc's heap, as megagnn sets for itself on CPUs)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **host_memory.ENVIRONMENT}


def size_config(family: str, size: str) -> Path:
    return ROOT / "configs" / "model" / f"{'mgnn' if family == 'painn' else family}-{size}.yaml"


def nominal_parameters(size: str) -> float:
    """'100k' -> 1e5, '1m' -> 1e6, '1b' -> 1e9 (the names of configs/model/)."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9}
    if size[-1:] not in units:
        raise SystemExit(f"--sizes {size}: use a configs/model/ size name such as 100k or 1m")
    return float(size[:-1]) * units[size[-1]]


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)


def megagnn_point(
    args, data: str, family: str, size: str, budget: float, long: bool, out: Path
) -> dict:
    result = out / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    sets = [f"data.path={data}", f"train.out_dir={out}", f"train.time_budget={budget}"]
    sets += ["train.progress=false", "checkpoint.every=1000000", "optim.ema_decay=0.99"]
    sets += [f"train.seed={args.seed}", *args.set]
    # long runs validate on a fixed subset along the way, to show how far from converged
    sets += [f"validate.every={args.long_eval_every if long else 0}"]
    sets += ["validate.structures=500"]
    cmd = [sys.executable, "-m", "megagnn.pretrain", "--config", args.config, "--set"]
    out.mkdir(parents=True, exist_ok=True)
    run([*cmd, *model_overrides(size_config(family, size)), *sets], out / "train.log")
    metrics = out / "test.json"
    cmd = [sys.executable, "-m", "megagnn.evaluate", "--run", str(out), "--json", str(metrics)]
    run([*cmd, "--checkpoint", "latest"], out / "evaluate.log")
    compute = json.loads((out / "compute.json").read_text())
    history = [
        {"step": m["step"], "forces_mae": m["val/forces_mae"]}
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "val/forces_mae" in m
    ]
    r = {
        "family": family,
        "parameters": parameters(out),
        "steps": compute["step"],
        "train_time_s": compute["wall_s"],
        "atoms_per_s": compute["atoms"] / compute["wall_s"],
        "val_history": history,
        **json.loads(metrics.read_text()),
    }
    result.write_text(json.dumps(r, indent=1))
    return r


def parameters(run_dir: Path) -> int:
    from megagnn.config import load_config
    from megagnn.models import build_model, count_parameters

    cfg = load_config(run_dir / "config.yaml")
    return count_parameters(build_model(cfg.model, device="meta"))


def export_split(args, name: str, data: str, work: Path) -> Path:
    """A one-step run records the split (a hash of group ids and data.split_seed, the same
    for every run on this data); tools/export_split.py writes it out for MACE."""
    split_run, out = work / name / "split", work / name / "split" / "extxyz"
    if not (out / "test.extxyz").exists():
        sets = [f"data.path={data}", f"train.out_dir={split_run}", "train.max_steps=1"]
        sets += ["validate.every=0", "train.progress=false", *args.set]
        split_run.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "megagnn.pretrain", "--config", args.config, "--set", *sets]
        run(cmd, split_run / "train.log")
        cmd = [sys.executable, str(ROOT / "tools/export_split.py"), str(split_run), "-o", str(out)]
        run([*cmd, "--no-progress"], split_run / "export.log")
    return out


def mace_channels(args, split: Path, target: float) -> int:
    cands = ",".join(str(c) for c in [*range(8, 64, 8), *range(64, 257, 16)])
    cmd = [args.mace_python, str(ROOT / "benchmarks/mace_baseline.py"), "--split", str(split)]
    out = subprocess.run(
        [*cmd, "--channels", cands, "--count-only"], check=True, capture_output=True, text=True
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    return int(min(counts, key=lambda c: abs(np.log(counts[c] / target))))


def mace_point(args, split: Path, channels: int, budget: float, long: bool, out: Path) -> dict:
    result = out / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [args.mace_python, str(ROOT / "benchmarks/mace_baseline.py"), "--split", str(split)]
    cmd += ["--channels", str(channels), "--budget", str(budget), "--threads", "1"]
    cmd += ["--seed", str(args.seed), "--out", str(out / "mace.json")]
    cmd += ["--eval-every-s", str(budget / 6 if long else 0)]
    run(cmd, out / "train.log")
    r = json.loads((out / "mace.json").read_text())
    result.write_text(json.dumps(r, indent=1))
    return r


def long_budgets(entries: list[str]) -> dict[str, float]:
    """--long-budget entries -> {model: seconds}, "" for every model not named."""
    budgets = {"": 900.0}
    for entry in entries:
        name, _, seconds = entry.rpartition("=")
        if name not in ("", *FAMILIES, "mace"):
            raise SystemExit(f"--long-budget {entry}: name one of {', '.join(FAMILIES)}, mace")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise SystemExit(f"--long-budget {entry}: give SECONDS or MODEL=SECONDS") from None
    return budgets


def same_split(a: Path, b: Path) -> bool:
    x, y = np.load(a / "splits.npz"), np.load(b / "splits.npz")
    return all(np.array_equal(x[k], y[k]) for k in ("train", "val", "test"))


def trend(history: list[dict]) -> str:
    """The last three validation force MAEs (meV/Å): is the run still improving?"""
    return " → ".join(f"{1e3 * h['forces_mae']:.0f}" for h in history[-3:]) or "-"


def table(rows: list[dict], mean_atoms: dict[str, float]) -> str:
    lines = [
        "| data | size | model | parameters | steps | structures/s | energy MAE (meV/atom) "
        "| forces MAE (meV/Å) | stress MAE (meV/Å^3) | val forces, last validations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = r.get("structures_per_s") or r["atoms_per_s"] / mean_atoms[r["data"]]
        lines.append(
            f"| {r['data']} | {r['size']} | {r['family']} | {r['parameters']:,} | {r['steps']} "
            f"| {sps:.1f} | {1e3 * r['energy_per_atom_mae']:.1f} | {1e3 * r['forces_mae']:.0f} "
            f"| {1e3 * r.get('stress_mae', float('nan')):.2f} | {trend(r['val_history'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER preprocessed datasets")
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"), help="recipe")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--sizes", nargs="+", default=["100k", "1m"], help="named sizes")
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per point")
    p.add_argument("--long-data", nargs="*", default=[], help="datasets of the long runs")
    p.add_argument(
        "--long-budget",
        nargs="+",
        default=[],
        metavar="[MODEL=]SECONDS",
        help="seconds per long run: one number for every model (default 900), then "
        "MODEL=SECONDS (a family or mace) for a model that needs another budget to converge",
    )
    p.add_argument(
        "--long-only", action="store_true", help="only the long runs (no equal-time points)"
    )
    p.add_argument(
        "--long-eval-every", type=int, default=400, help="steps between validations (long runs)"
    )
    p.add_argument("--mace-python", help="python of the mace-torch environment (none: skip)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="overrides for every megagnn run")
    p.add_argument("--work", default=str(ROOT / "runs/architectures"), help="run folders")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    targets = {size: nominal_parameters(size) for size in args.sizes}  # checked before any run
    long_budget = long_budgets(args.long_budget)
    missing = [str(size_config(f, s)) for f in args.families for s in args.sizes]
    missing = [m for m in missing if not Path(m).exists()]
    if missing:
        raise SystemExit(f"no size config {', '.join(missing)}: see configs/model/")

    work = Path(args.work)
    datasets = dict(d.split("=", 1) for d in args.data)
    splits = {name: export_split(args, name, path, work) for name, path in datasets.items()}
    mean_atoms = {}
    for name, path in datasets.items():
        manifest = json.loads((Path(path) / "dataset.json").read_text())
        mean_atoms[name] = manifest["n_atoms"] / manifest["n_structures"]

    jobs = []  # (label dict, callable)
    # the long runs first, so that the pool ends with short runs on both slots
    points = [(d, args.sizes[0], long_budget, "long") for d in args.long_data]
    if not args.long_only:
        points += [(d, s, {"": args.budget}, "equal time") for d in datasets for s in args.sizes]
    channels: dict[tuple[str, str], int] = {}
    for d, size, budgets, kind in points:
        for fam in args.families:
            budget = budgets.get(fam, budgets[""])
            tag = f"{size}-{int(budget)}s"
            out = work / d / f"{fam}-{tag}"
            label = {"data": d, "size": size, "budget_s": budget, "kind": kind, "run": str(out)}
            long = kind == "long"
            jobs.append(
                (
                    label,
                    lambda d=d, f=fam, s=size, b=budget, g=long, o=out: megagnn_point(
                        args, datasets[d], f, s, b, g, o
                    ),
                )
            )
        if args.mace_python:
            if (d, size) not in channels:
                channels[d, size] = mace_channels(args, splits[d], targets[size])
            c = channels[d, size]
            budget = budgets.get("mace", budgets[""])
            tag = f"{size}-{int(budget)}s"
            out = work / d / f"mace-{tag}"
            label = {"data": d, "size": size, "budget_s": budget, "kind": kind, "run": str(out)}
            jobs.append(
                (
                    label,
                    lambda s=splits[d], c=c, b=budget, g=long, o=out: mace_point(
                        args, s, c, b, g, o
                    ),
                )
            )

    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [(label, pool.submit(fn)) for label, fn in jobs]
        rows = []
        for i, (label, fut) in enumerate(futures):
            rows.append({**label, **fut.result()})
            print(
                f"[{i + 1}/{len(jobs)}] {label['data']} {label['size']} {rows[-1]['family']} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    for r in rows:
        if r["family"] != "mace":
            assert same_split(Path(r["run"]), splits[r["data"]].parent), r["run"]

    sections = []
    for kind in ("equal time", "long"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            budgets = sorted({r["budget_s"] for r in sel})
            head = f"## {kind}: {', '.join(f'{b:g}' for b in budgets)} s of training, one thread"
            sections.append(f"{head}\n\n{table(sel, mean_atoms)}")
    text = "\n\n".join(sections)
    print(text)
    if args.out:
        write_results(
            args.out,
            __file__,
            argv,
            device="CPU, one thread per run",
            data={"rows": rows},
            text=text,
            mace_channels={f"{d}/{s}": c for (d, s), c in channels.items()},
            jobs_at_once=args.jobs,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
