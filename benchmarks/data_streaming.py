#!/usr/bin/env python
"""Streaming data at growing dataset size: memory of a reading rank and loader throughput
against what the model consumes.

    python benchmarks/data_streaming.py --base 1000 --scales 1 10 \\
        --out benchmarks/results/data-streaming-cpu

Builds one EMT dataset of --base structures and datasets of SCALE times as many structures
(the same records repeated, in shards of --shard-size), then, for each, in a fresh process:
opens it as a training rank does (index of sizes, seeded split, budget batches), reads
--batches batches with neighbour lists built in the loader, and reports resident memory
(after imports, after the index, peak while reading) and loader structures/s. The model's
consumption (structures/s of a forward+backward with conservative forces on the same
batches, one thread) is measured in the same process, so the ratio says whether the loader
keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from megagnn.config import load_config
    from megagnn.data.sampler import iterate_batches
    from megagnn.models import build_model
    from megagnn.training.sources import DataSplits

    torch.set_num_threads(1)
    start = rss()
    cfg = load_config(args.model, [f"data.path={args.worker}", f"data.max_atoms={args.max_atoms}"])
    data = DataSplits(cfg)
    index = rss()
    sampler = data.sampler("train", shuffle=True)
    t0, structures, batches = time.perf_counter(), 0, []
    for k, batch in enumerate(iterate_batches(data.graphs, sampler, epoch=0)):
        structures += len(batch["energy"])
        if len(batches) < args.model_batches:
            batches.append(batch)
        if k + 1 == args.batches:
            break
    load_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_model(cfg.model).double()
    t0, consumed = time.perf_counter(), 0
    for batch in batches:
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        out = model(batch)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
        loss.backward()
        consumed += len(batch["energy"])
    model_s = time.perf_counter() - t0
    return {
        "structures_in_dataset": len(data.dataset),
        "shards": len(data.dataset.manifest["shards"]),
        "rss_after_imports_mb": start / 1e6,
        "rss_after_index_mb": index / 1e6,
        "peak_rss_while_reading_mb": peak / 1e6,
        "batches_read": min(args.batches, k + 1),
        "loader_structures_per_s": structures / load_s,
        "model_structures_per_s": consumed / model_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", type=int, default=1000, help="structures in the 1x dataset")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="dataset multiples")
    p.add_argument("--shard-size", type=int, default=500, help="structures per shard")
    p.add_argument("--batches", type=int, default=200, help="batches read per dataset")
    p.add_argument("--model-batches", type=int, default=10, help="batches the model consumes")
    p.add_argument("--max-atoms", type=int, default=256, help="atom budget per batch")
    p.add_argument("--model", default=str(ROOT / "configs/model/mgnn-100k.yaml"))
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import ase.io

    from megagnn.data.emt import generate
    from megagnn.data.preprocess import preprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "base.extxyz"
        ase.io.write(raw, list(generate(args.base, seed=0, progress=True)))
        for scale in args.scales:
            folder = Path(tmp) / f"x{scale}"
            preprocess([str(raw)] * scale, folder, shard_size=args.shard_size, progress=True)
            cmd = [sys.executable, __file__, "--worker", str(folder)]
            cmd += ["--batches", str(args.batches), "--model-batches", str(args.model_batches)]
            cmd += ["--max-atoms", str(args.max_atoms), "--model", args.model]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append({"scale": scale, **json.loads(proc.stdout.strip().splitlines()[-1])})
    base = rows[0]
    lines = [
        "| data | structures | shards | RSS after index MB | peak RSS reading MB "
        "| growth vs first (MB) | loader structures/s | model structures/s | loader / model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']}x | {r['structures_in_dataset']} | {r['shards']} "
            f"| {r['rss_after_index_mb']:.0f} | {r['peak_rss_while_reading_mb']:.0f} "
            f"| {r['peak_rss_while_reading_mb'] - base['peak_rss_while_reading_mb']:+.1f} "
            f"| {r['loader_structures_per_s']:.0f} | {r['model_structures_per_s']:.1f} "
            f"| {r['loader_structures_per_s'] / r['model_structures_per_s']:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        import torch

        device = "cpu, one thread"
        write_results(
            args.out, __file__, argv, device, {"rows": rows}, text, torch=torch.__version__
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
