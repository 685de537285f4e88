#!/usr/bin/env python
"""Preprocessing and streaming at scale: structures/s against worker processes, and a
dataset of a million structures preprocessed and streamed with flat memory.

    python benchmarks/preprocess_scaling.py --structures 1000000 --sweep 20000 \\
        --workers 1 2 4 --out benchmarks/results/preprocess-scaling-cpu

Synthetic structures (small rattled fcc alloy cells with made-up labels: the cost of
preprocessing does not depend on where labels come from), ten per group, written as one
extxyz file. Then, each in a fresh process:
1. the first --sweep structures preprocessed with each --workers count (same input, same
   run: structures/s and the speedup over one worker);
2. all --structures preprocessed with the largest worker count: wall time and peak
   resident memory of the main process and of the largest worker;
3. prefixes of the big dataset (1%, 10%, 100% of its shards) opened as a training run
   opens them: group split, the training-statistics pass over every training record, then
   --batches budget batches read; resident memory after each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent
ELEMENTS = np.array([13, 28, 29, 46, 47, 78, 79])
SYMBOLS = {13: "Al", 28: "Ni", 29: "Cu", 46: "Pd", 47: "Ag", 78: "Pt", 79: "Au"}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1e3


def write_synthetic(path: Path, n: int, seed: int = 0) -> None:
    """n structures of 8 atoms (a rattled cubic fcc cell doubled along x), ten per group,
    written as extxyz directly (ase.io.write would take longer than the preprocessing)."""
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    frac = np.concatenate([base * [0.5, 1, 1], base * [0.5, 1, 1] + [0.5, 0, 0]])
    with open(path, "w") as f:
        for k in range(n):
            a = rng.uniform(3.6, 4.1)
            cell = np.diag([2 * a, a, a])
            pos = frac @ cell + rng.normal(0, 0.05, (8, 3))
            z = rng.choice(ELEMENTS, 8)
            forces = rng.normal(0, 0.5, (8, 3))
            energy = -3.0 * 8 + rng.normal(0, 0.1)
            lattice = " ".join(f"{x:.8f}" for x in cell.flat)
            f.write(
                f'8\nLattice="{lattice}" Properties=species:S:1:pos:R:3:forces:R:3 '
                f'energy={energy:.8f} group=syn-{k // 10} pbc="T T T"\n'
            )
            for zi, p, fi in zip(z, pos, forces, strict=True):
                f.write(
                    f"{SYMBOLS[int(zi)]} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f} "
                    f"{fi[0]:.8f} {fi[1]:.8f} {fi[2]:.8f}\n"
                )


def run_json(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def preprocess_worker(raw: str, out: str, workers: int, cutoff: float, shard: int) -> dict:
    from megagnn.data.preprocess import preprocess

    t0 = time.perf_counter()
    m = preprocess([raw], out, shard, cutoff=cutoff, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    return {
        "workers": workers,
        "structures": m["n_structures"],
        "shards": len(m["shards"]),
        "wall_s": wall,
        "structures_per_s": m["n_structures"] / wall,
        "peak_rss_main_mb": peak_mb(),
        "peak_rss_largest_worker_mb": peak_mb(resource.RUSAGE_CHILDREN),
    }


def stream_worker(folder: str, batches: int, cutoff: float) -> dict:
    from megagnn.config import load_config
    from megagnn.data.sampler import iterate_batches
    from megagnn.training.sources import DataSplits

    start = rss_mb()
    cfg = load_config(None, [f"data.path={folder}", f"model.cutoff={cutoff}", "data.max_atoms=256"])
    t0 = time.perf_counter()
    data = DataSplits(cfg)
    split_s, after_split = time.perf_counter() - t0, rss_mb()
    t0 = time.perf_counter()
    stats = data.statistics()
    stats_s, after_stats = time.perf_counter() - t0, rss_mb()
    t0, seen = time.perf_counter(), 0
    sampler = data.sampler("train", shuffle=True)
    for k, batch in enumerate(iterate_batches(data.graphs, sampler, epoch=0)):
        seen += len(batch["energy"])
        if k + 1 == batches:
            break
    read_s = time.perf_counter() - t0
    return {
        "structures": len(data.dataset),
        "shards": len(data.dataset.manifest["shards"]),
        "train_structures": stats["n_structures"],
        "rss_after_imports_mb": start,
        "rss_after_split_mb": after_split,
        "rss_after_statistics_mb": after_stats,
        "peak_rss_mb": peak_mb(),
        "split_s": split_s,
        "statistics_s": stats_s,
        "statistics_structures_per_s": stats["n_structures"] / stats_s,
        "loader_structures_per_s": seen / read_s,
    }


def prefix_dataset(full: Path, folder: Path, fraction: float) -> Path:
    """A dataset made of the first ``fraction`` of ``full``'s shards (a manifest only)."""
    m = json.loads((full / "dataset.json").read_text())
    keep = m["shards"][: max(1, round(fraction * len(m["shards"])))]
    m["shards"] = [{**s, "file": os.path.relpath(full / s["file"], folder)} for s in keep]
    m["n_structures"] = sum(s["n_structures"] for s in keep)
    m["n_atoms"] = sum(s["n_atoms"] for s in keep)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(m))
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--structures", type=int, default=1_000_000, help="size of the big dataset")
    p.add_argument("--sweep", type=int, default=20_000, help="structures in the worker sweep")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--cutoff", type=float, default=5.0, help="edge counts at this cutoff (Å)")
    p.add_argument("--batches", type=int, default=200, help="batches read when streaming")
    p.add_argument("--tmp", help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--shard-size", type=int, default=10_000, help="shard size, big dataset")
    p.add_argument("--preprocess-worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--stream-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preprocess_worker:
        raw, out, workers, cutoff, shard = args.preprocess_worker
        print(json.dumps(preprocess_worker(raw, out, int(workers), float(cutoff), int(shard))))
        return 0
    if args.stream_worker:
        folder, batches, cutoff = args.stream_worker
        print(json.dumps(stream_worker(folder, int(batches), float(cutoff))))
        return 0

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="megagnn-preprocess-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        small, big = tmp / "sweep.extxyz", tmp / "big.extxyz"
        write_synthetic(small, args.sweep)
        sweep, cutoff = [], str(args.cutoff)
        for w in args.workers:
            out = tmp / f"sweep-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            chunk = str(max(1, args.sweep // 8))  # 8 chunks to spread over the workers
            row = run_json(["--preprocess-worker", str(small), str(out), str(w), cutoff, chunk])
            sweep.append(row)
            print(f"sweep: {row}", flush=True)
            shutil.rmtree(out)
        write_synthetic(big, args.structures)
        print(f"wrote inputs in {time.perf_counter() - t0:.0f} s", flush=True)
        full = tmp / "full"
        shutil.rmtree(full, ignore_errors=True)
        w = max(args.workers)
        shard = str(args.shard_size)
        large = run_json(["--preprocess-worker", str(big), str(full), str(w), cutoff, shard])
        print(f"full: {large}", flush=True)
        big.unlink()
        stream = []
        for fraction in (0.01, 0.1, 1.0):
            folder = prefix_dataset(full, tmp / f"prefix-{fraction:g}", fraction)
            row = run_json(["--stream-worker", str(folder), str(args.batches), str(args.cutoff)])
            stream.append({"fraction": fraction, **row})
            print(f"stream: {stream[-1]}", flush=True)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    one = sweep[0]["structures_per_s"]
    lines = [
        f"## Preprocessing {args.sweep} structures (8 atoms each, edge counts at "
        f"{args.cutoff} Å; 8 chunks; each worker process pays ~2 s of imports)",
        "",
        "| workers | structures/s | speedup vs 1 worker |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['workers']} | {r['structures_per_s']:.0f} | {r['structures_per_s'] / one:.2f}x |"
        for r in sweep
    ]
    lines += [
        "",
        f"## {large['structures']:,} structures with {large['workers']} workers",
        "",
        f"- wall {large['wall_s']:.0f} s ({large['structures_per_s']:.0f} structures/s), "
        f"{large['shards']} shards",
        f"- peak RSS: main process {large['peak_rss_main_mb']:.0f} MB, largest worker "
        f"{large['peak_rss_largest_worker_mb']:.0f} MB",
        "",
        "## Streaming prefixes of it (one process: split, training statistics, batches)",
        "",
        "| structures | shards | RSS after split MB | RSS after statistics MB | peak RSS MB "
        "| statistics pass structures/s | loader structures/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['structures']:,} | {r['shards']} | {r['rss_after_split_mb']:.0f} "
        f"| {r['rss_after_statistics_mb']:.0f} | {r['peak_rss_mb']:.0f} "
        f"| {r['statistics_structures_per_s']:.0f} | {r['loader_structures_per_s']:.0f} |"
        for r in stream
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        doc = {"sweep": sweep, "large": large, "stream": stream}
        write_results(args.out, __file__, argv, f"cpu, {os.cpu_count()} cores", doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
