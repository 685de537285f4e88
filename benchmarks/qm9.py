#!/usr/bin/env python
"""QM9 U0 on the standard protocol: 110,000 training molecules, 10,000 validation, the
rest (10,831) test; energy only; test MAE per molecule beside the published table.

    python benchmarks/qm9.py --models painn=mgnn-100k irrep=irrep-100k --budget 5400 \\
        --jobs 2 --work runs/qm9 --out benchmarks/results/qm9-u0-cpu

Each model is an ordinary run: `megagnn.pretrain --config configs/qm9.yaml` with the
size's model config (configs/model/<size>.yaml) and train.time_budget=--budget, then
`megagnn.evaluate` on the test split with the run's weight average. The split is the one
committed in benchmarks/results/qm9-split.npz (QM9 ids; written on first use from a seeded
permutation of every molecule). The data is preprocessed from the installed qm9pack when
--data holds none. Runs resume where they stopped (checkpoints every 10 minutes; the time
budget counts the time already spent), so a benchmark may span several sittings; a finished
model (its row in <out>-rows/, committed with the results) is not rerun, and the table
holds every finished model. Every process gets one thread: --jobs runs at once,
each of --procs data-parallel processes.
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
from llm_techniques import model_overrides  # benchmarks/, the scripts' own folder
from results_io import write_results

from megagnn.training import host_memory

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **host_memory.ENVIRONMENT}
SPLIT = ROOT / "benchmarks" / "results" / "qm9-split.npz"
SIZES = {"train": 110_000, "val": 10_000}
# U0 test MAE (meV) with 110k training molecules: PaiNN (Schütt et al., ICML 2021, Table 2),
# the others as collected in the EquiformerV2 paper's QM9 table (Liao et al., ICLR 2024)
PUBLISHED = {
    "PaiNN": 5.85,
    "TorchMD-NET": 6.15,
    "DimeNet++": 6.32,
    "Equiformer": 6.59,
    "EGNN": 11.0,
    "SchNet": 14.0,
}


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)


def ensure_data(data: Path, workers: int) -> None:
    if (data / "dataset.json").is_file():
        return
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--format", "qm9"]
    cmd += ["-o", str(data), "--cutoff", "5.0", "--workers", str(workers)]
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_split(data: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The committed split (QM9 ids per part), written first from a seeded permutation."""
    if not SPLIT.is_file():
        from megagnn.data.shards import ShardedDataset

        ids = ShardedDataset(data).record_ids()
        order = np.random.default_rng(seed).permutation(len(ids))
        cut = [SIZES["train"], SIZES["train"] + SIZES["val"]]
        parts = dict(zip(("train", "val", "test"), np.split(ids[order], cut), strict=True))
        np.savez_compressed(
            SPLIT, **{k: np.sort(v.astype(int)).astype(str) for k, v in parts.items()}
        )
    with np.load(SPLIT) as f:
        return {k: f[k] for k in ("train", "val", "test")}


def kept(args) -> Path:
    """Where finished models' rows are kept (committed beside the results): a later sitting
    on another machine finds them done and tables them with its own."""
    return Path(f"{args.out}-rows")


def point(args, name: str, size: str) -> dict:
    out = Path(args.work) / name
    result = kept(args) / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    family = name.split("-")[0]
    sets = [f"model.family={family}", f"data.path={args.data}", f"data.split_file={SPLIT}"]
    sets += [f"train.out_dir={out}", f"train.time_budget={args.budget}"]
    sets += ["train.progress=false", "train.threads=1", *args.set]
    config = ROOT / "configs" / "model" / f"{size}.yaml"
    launch = [sys.executable, "-m"]
    if args.procs > 1:  # data parallel over local processes, one thread each
        launch += ["torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}", "-m"]
    cmd = [*launch, "megagnn.pretrain", "--config", str(ROOT / "configs/qm9.yaml")]
    out.mkdir(parents=True, exist_ok=True)
    run([*cmd, "--set", *model_overrides(config), *sets], out / "train.log")
    metrics = out / "test.json"
    cmd = [sys.executable, "-m", "megagnn.evaluate", "--run", str(out), "--json", str(metrics)]
    cmd += ["--checkpoint", "latest", "--no-progress", "--threads", "1"]
    run([*cmd, "--predictions", str(out / "test-predictions.csv")], out / "evaluate.log")
    test = json.loads(metrics.read_text())
    compute = json.loads((out / "compute.json").read_text())
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    curve = [
        {"epoch": round(m["val/epoch"], 3), "val_mae_meV": 1e3 * m["val/energy_mae"]}
        for m in lines
        if "val/energy_mae" in m
    ]
    r = {
        "model": name,
        "size": size,
        "family": family,
        "parameters": parameters(out),
        "train_structures": SIZES["train"],
        "epochs": curve[-1]["epoch"] if curve else None,
        "steps": compute["step"],
        "train_time_s": compute["wall_s"],
        "test_mae_meV": 1e3 * test["energy_mae"],
        "test_rmse_meV": 1e3 * test["energy_rmse"],
        "test_structures": test["structures"],
        "val_curve": curve,
    }
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(r, indent=1))
    return r


def parameters(run_dir: Path) -> int:
    from megagnn.config import load_config
    from megagnn.models import build_model, count_parameters

    cfg = load_config(run_dir / "config.yaml")
    return count_parameters(build_model(cfg.model, device="meta"))


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | epochs | train time | test U0 MAE (meV) | RMSE (meV) |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| megagnn {r['model']} ({r['size']}) | {r['parameters']:,} | {r['epochs']:.1f} | "
            f"{r['train_time_s'] / 3600:.2f} h | {r['test_mae_meV']:.2f} | "
            f"{r['test_rmse_meV']:.2f} |"
        )
    for model, mae in PUBLISHED.items():
        lines.append(f"| {model} (published) | | | | {mae:.2f} | |")
    curves = ["", "Validation MAE (meV, 2,000 fixed validation molecules) against epochs:", ""]
    for r in rows:
        points = ", ".join(f"{c['epoch']:.1f}: {c['val_mae_meV']:.1f}" for c in r["val_curve"])
        curves.append(f"- {r['model']}: {points}")
    return "\n".join(lines + curves)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["painn=mgnn-100k", "irrep=irrep-100k"],
        help="NAME=SIZE: family (the name before any '-') and a configs/model size",
    )
    p.add_argument("--budget", type=float, default=3600, help="seconds of training per model")
    p.add_argument("--data", default="data/qm9/processed", help="preprocessed QM9")
    p.add_argument("--work", default="runs/qm9", help="run folders (resumed, not rerun)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument(
        "--procs", type=int, default=1, help="data-parallel processes per run (torchrun)"
    )
    p.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--out", default="benchmarks/results/qm9-u0-cpu", help="results stem")
    args = p.parse_args(argv)
    data = Path(args.data)
    ensure_data(data, args.workers)
    ensure_split(data)
    models = [m.split("=", 1) for m in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda m: point(args, *m), models))
    # every model finished so far, in this sitting or an earlier one
    rows = [json.loads(p.read_text()) for p in sorted(kept(args).glob("*.json"))]
    write_results(
        args.out,
        __file__,
        argv,
        f"{os.cpu_count()}-core x86-64 CPU, {args.jobs} run(s) at once, each "
        f"{args.procs} process(es) of one thread",
        {"rows": rows, "published_meV": PUBLISHED},
        table(rows),
        protocol="QM9 U0, 110,000 train / 10,000 val / 10,831 test (qm9-split.npz), "
        "energy only, per-molecule L1 loss, weight average 0.999",
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
