#!/usr/bin/env python
"""The largest periodic structure one process evaluates: energy, forces and stress of
rattled fcc Cu supercells through the ASE calculator, each size in a fresh process whose
peak RSS is read back, with edges evaluated in chunks (the calculator's default) or in one
piece (--edge-chunk 0).

    python benchmarks/large_structure.py --models mgnn-100k mgnn-1m \\
        --atoms 4000 32000 256000 1000000 --out benchmarks/results/large-structure-cpu

A model is a size name of configs/model/ with random weights and Cu statistics (memory and
time do not depend on the weights). Rows: model, atoms, edges, forces, peak_rss_bytes,
seconds (one evaluation, neighbour list included), bytes per atom, seconds per atom.

`--ranks 2` evaluates each structure across two tensor-parallel processes under torchrun
with node-parallel regions (the calculator given the rank's slices of the model); the row's
peak is the largest rank's, `peak_rss_bytes_per_rank` has each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_results  # benchmarks/, the scripts' own folder

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> dict:
    import torch
    from ase.build import bulk

    from megagnn.config import load_config
    from megagnn.inference.calculator import MegaGNNCalculator
    from megagnn.models import build_model

    torch.set_num_threads(args.threads)
    overrides = [f"model.cutoff={args.cutoff}"]
    cfg = load_config(str(ROOT / "configs" / "model" / f"{args.model}.yaml"), overrides).model
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:  # under torchrun: the structure across a tensor-parallel group
        from megagnn.config import ParallelConfig
        from megagnn.parallel.materialize import materialize
        from megagnn.parallel.state import init_parallel
        from megagnn.parallel.tensor import parallelize_tensor

        par = init_parallel(ParallelConfig(tensor=ranks))
        model = parallelize_tensor(build_model(cfg, device="meta"), par.tp_group, True)
        model = materialize(model, 0).to(dtype).eval()
    else:
        model = build_model(cfg).to(dtype).eval()
    model.set_statistics(0, {29: -3.7}, 0.5, 40.0)
    reps = max(1, round((args.atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    atoms.rattle(0.05, seed=0)
    chunk = args.edge_chunk or None
    calc = MegaGNNCalculator(model, dtype=dtype, edge_chunk=chunk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    atoms.calc = calc
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    seconds = time.perf_counter() - start
    from megagnn.data.neighbors import neighbor_list

    edges = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, args.cutoff)[0].shape[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_rank = [(peak, base)]
    if ranks > 1:
        import torch.distributed as dist

        per_rank = [None] * ranks
        dist.all_gather_object(per_rank, (peak, base))
        peak, base = max(per_rank)
    return {
        "model": args.model,
        "ranks": ranks,
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "node_parallel": ranks > 1,
        "peak_rss_bytes_per_rank": [p for p, _ in per_rank],
        "parameters": sum(p.numel() for p in build_model(cfg, device="meta").parameters()),
        "atoms": len(atoms),
        "edges": int(edges),
        "dtype": args.dtype,
        "edge_chunk": chunk,
        "forces": bool(forces.shape == (len(atoms), 3)),
        "stress": bool(stress.shape == (6,)),
        "peak_rss_bytes": peak,
        "rss_before_bytes": base,
        "seconds": seconds,
        "bytes_per_atom": (peak - base) / len(atoms),
        "seconds_per_atom": seconds / len(atoms),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mgnn-100k"], help="size names")
    p.add_argument("--atoms", nargs="+", type=int, default=[4000, 32000])
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--edge-chunk", type=int, default=2**16, help="0: one piece")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="per process")
    p.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="evaluate each structure across this many tensor-parallel processes (torchrun, "
        "node-parallel regions); peaks are per rank",
    )
    p.add_argument(
        "--mmap-threshold",
        type=int,
        help="bytes: glibc serves larger allocations with their own mmap and unmaps them when "
        "freed (MALLOC_MMAP_THRESHOLD_; 2**20 returns a chunk's memory to the system after "
        "each use: lower peaks, more page faults); default: glibc's own sliding threshold",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.atoms = args.atoms[0]
        row = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return 0
    rows = []
    launch = [sys.executable]
    if args.ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", "--standalone"]
    for model in args.models:
        for atoms in args.atoms:
            cmd = [*launch, __file__, "--worker", "--model", model, "--atoms", str(atoms)]
            cmd += ["--cutoff", str(args.cutoff), "--dtype", args.dtype]
            cmd += ["--edge-chunk", str(args.edge_chunk), "--threads", str(args.threads)]
            env = dict(os.environ)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=env
                )
            except subprocess.TimeoutExpired:
                rows.append({"model": model, "atoms": atoms, "error": "timeout"})
                print(rows[-1], flush=True)
                continue
            if proc.returncode != 0:  # killed for memory (-9) or an error
                err = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                rows.append({"model": model, "atoms": atoms, "error": err[0]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if args.out:
        lines = [
            "| model | ranks | mmap threshold | atoms | edges | peak RSS a rank (GB) "
            "| bytes/atom | seconds | µs/atom |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | | | {r['atoms']:,} | | {r['error']} | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r.get('ranks', 1)} | {r.get('mmap_threshold') or 'glibc'} | "
                f"{r['atoms']:,} | {r['edges']:,} | "
                f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['bytes_per_atom']:,.0f} | "
                f"{r['seconds']:.1f} | {r['seconds_per_atom'] * 1e6:.0f} |"
            )
        device = f"cpu, {args.ranks} x {args.threads} threads, {args.dtype}"
        write_results(args.out, __file__, argv, device, {"rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
