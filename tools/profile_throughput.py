#!/usr/bin/env python
"""Training-step throughput and memory of megagnn models, per parallel layout.

For a model config and a fixed periodic batch, runs the Trainer's own training step and
reports per rank: step time (median), atoms/s and edges/s, matmul FLOP/s, parameter memory,
activation memory (bytes autograd keeps for backward, weights excluded), bytes handed to
collectives and point-to-point sends, and peak CUDA memory on GPUs. Each layout runs under
torchrun; the table compares every layout with the first one.

    python tools/profile_throughput.py --model configs/model/mgnn-1m.yaml --atoms 864 \\
        --layouts 1x1 2x1 1x2 --set model.forces=direct model.stress=false \\
        --out benchmarks/results/parallel-cpu.json

A layout is TENSORxPIPELINE (2x1: two tensor-parallel ranks), with a trailing n for
node-parallel regions (2x1n: the atoms are split over the tensor-parallel ranks between
blocks too). Pipeline stages need model.forces=direct or none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="configs/model/mgnn-1m.yaml", help="model config YAML")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--atoms", type=int, default=500, help="atoms in the fixed batch (about)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TENSORxPIPELINE[n]")
    p.add_argument("--out", help="write all results to this JSON file (and a .md table)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one layout, write JSON
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    """Inside torchrun: profile this rank, gather every rank's result on rank 0."""
    import torch
    import torch.distributed as dist

    from megagnn.config import load_config
    from megagnn.parallel.state import destroy_parallel, init_parallel
    from megagnn.profiling import profile_step

    cfg = load_config(args.model, [*args.set, "train.progress=false"])
    par = init_parallel(cfg.parallel)
    torch.set_num_threads(1)  # one core per rank: layouts compare at equal compute
    result = profile_step(cfg, par, args.atoms, args.steps)
    results = [result]
    if dist.is_initialized():
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
    if par.is_main:
        Path(args.worker).write_text(json.dumps(results))
    destroy_parallel()


def run_layout(args: argparse.Namespace, layout: str) -> list[dict]:
    spec = layout.lower()
    nodes = spec.endswith("n")
    try:
        tensor, pipeline = (int(x) for x in spec.removesuffix("n").split("x"))
    except ValueError:
        sys.exit(f"layout {layout!r} is not TENSORxPIPELINE[n], e.g. 2x1 or 2x1n")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        overrides = [
            *args.set,
            f"parallel.tensor={tensor}",
            f"parallel.pipeline={pipeline}",
            f"parallel.node_parallel={str(nodes).lower()}",
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={tensor * pipeline}",
            __file__,
            "--model",
            args.model,
            "--atoms",
            str(args.atoms),
            "--steps",
            str(args.steps),
            "--worker",
            str(out),
            "--set",
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"layout {layout} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def summarize(layout: str, ranks: list[dict]) -> dict:
    """Per-layout figures: the slowest rank's time, the largest rank's memory."""
    step = max(r["step_time_s"] for r in ranks)
    first = ranks[0]
    return {
        "layout": layout,
        "ranks": len(ranks),
        "step_time_s": step,
        "atoms_per_s": first["atoms"] / step,
        "edges_per_s": first["edges"] / step,
        "matmul_gflop_per_s": sum(r["matmul_flops"] for r in ranks) / step / 1e9,
        "max_parameter_bytes_per_rank": max(r["parameter_bytes"] for r in ranks),
        "max_activation_bytes_per_rank": max(r["activation_bytes"] for r in ranks),
        "max_communication_bytes_per_rank": max(
            sum(r["communication_bytes"].values()) for r in ranks
        ),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| layout (TPxPP) | ranks | step s | atoms/s | params/rank MB (x) "
        "| activations/rank MB (x) | comm/rank MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, a = r["max_parameter_bytes_per_rank"], r["max_activation_bytes_per_rank"]
        lines.append(
            f"| {r['layout']} | {r['ranks']} | {r['step_time_s']:.3f} | {r['atoms_per_s']:.0f} "
            f"| {p / 1e6:.2f} ({p / base['max_parameter_bytes_per_rank']:.2f}) "
            f"| {a / 1e6:.2f} ({a / base['max_activation_bytes_per_rank']:.2f}) "
            f"| {r['max_communication_bytes_per_rank'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = list
    rows, raw = [], {}
    for layout in tqdm(args.layouts, desc="layouts"):
        ranks = run_layout(args, layout)
        raw[layout] = ranks
        rows.append(summarize(layout, ranks))
    text = table(rows)
    print(text)
    if args.out:
        import torch

        meta = {
            "date": date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "summary": rows, "ranks": raw}, indent=1))
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        out.with_suffix(".md").write_text(f"{header}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
