#!/usr/bin/env python
"""Training-step throughput and memory of megagnn models, per model size and parallel layout.

For each model config (a path or a size name from configs/model/) and a fixed periodic batch,
runs the Trainer's own training step and reports per rank: step time (median), atoms/s and
edges/s, achieved matmul FLOP/s (FLOPs of the linears, counted by torch), parameter memory,
activation memory (bytes autograd keeps for backward, weights excluded), bytes handed to
collectives and point-to-point sends, peak host memory and, on GPUs, peak CUDA memory. Each
layout runs under torchrun with one thread per rank; the table compares every row of a model
with its first layout.

    python tools/profile_throughput.py --model mgnn-100k mgnn-1m --atoms 500 --layouts 1x1 2x1n
    python tools/profile_throughput.py --model configs/model/mgnn-1m.yaml --atoms 864 \\
        --layouts 1x1 2x1 1x2 --set model.forces=direct model.stress=false \\
        --out benchmarks/results/parallel-cpu.json
    python tools/profile_throughput.py --model schnet-1m --layouts 1x1 --compare pyg \\
        --set model.rbf=gaussian model.stress=false

A layout is TENSORxPIPELINE[xDATA] (2x1: two tensor-parallel ranks; 1x1x2: two
data-parallel replicas, whose optimizer state is sharded under parallel.shard_optimizer), with a
trailing n for node-parallel regions (2x1n: the atoms are split over the tensor-parallel
ranks between blocks too). Pipeline stages need model.forces=direct or none.

--compare pyg adds a baseline row per model: SchNet of the same width, depth and radial
basis built from PyTorch Geometric's interaction blocks, trained on the same batch with
energy + conservative-force loss in one thread (needs `pip install torch_geometric`; it is
not a megagnn dependency). Its speed column is megagnn's first layout's atoms/s over the
baseline's. --top N prints the N operators with the most self time on rank 0 (every rank profiles).
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
    p.add_argument(
        "--model",
        nargs="+",
        default=["configs/model/mgnn-1m.yaml"],
        help="model config YAMLs or size names from configs/model/ (e.g. mgnn-1m schnet-10m)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--atoms", type=int, default=500, help="atoms in the fixed batch (about)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TENSORxPIPELINE[n]")
    p.add_argument(
        "--compare",
        choices=["pyg"],
        help="also run a baseline of the same architecture (SchNet from PyG) in this run",
    )
    p.add_argument("--top", type=int, default=0, help="report the N slowest operators (rank 0)")
    p.add_argument("--out", help="write all results to this JSON file (and a .md table)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one layout, write JSON
    return p.parse_args(argv)


def resolve_model(name: str) -> str:
    """A config path as given, or a size name looked up in configs/model/."""
    if Path(name).suffix in (".yaml", ".yml") or Path(name).exists():
        if not Path(name).exists():
            sys.exit(f"--model {name}: no such file")
        return name
    path = ROOT / "configs" / "model" / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
        sys.exit(f"--model {name}: not a config file or a size name ({', '.join(names)})")
    return str(path)


def run_worker(args: argparse.Namespace) -> None:
    """Inside torchrun: profile this rank, gather every rank's result on rank 0."""
    import torch
    import torch.distributed as dist

    from megagnn.config import load_config
    from megagnn.parallel.state import destroy_parallel, init_parallel
    from megagnn.profiling import profile_step

    cfg = load_config(args.model[0], [*args.set, "train.progress=false"])
    par = init_parallel(cfg.parallel)
    torch.set_num_threads(1)  # one core per rank: layouts compare at equal compute
    # every rank runs the profiled step (it has collectives); rank 0's table is reported
    result = profile_step(cfg, par, args.atoms, args.steps, top=args.top)
    results = [result]
    if dist.is_initialized():
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
    if par.is_main:
        Path(args.worker).write_text(json.dumps(results))
    destroy_parallel()


def run_layout(args: argparse.Namespace, model: str, layout: str) -> list[dict]:
    spec = layout.lower()
    nodes = spec.endswith("n")
    try:
        sizes = [int(x) for x in spec.removesuffix("n").split("x")]
        tensor, pipeline, data = (sizes + [1])[:3] if len(sizes) in (2, 3) else [0, 0, 0]
    except ValueError:
        tensor = 0
    if not tensor:
        sys.exit(f"layout {layout!r} is not TENSORxPIPELINE[xDATA][n], e.g. 2x1, 1x1x2, 2x1n")
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
            f"--nproc_per_node={tensor * pipeline * data}",
            __file__,
            "--model",
            model,
            "--atoms",
            str(args.atoms),
            "--steps",
            str(args.steps),
            "--top",
            str(args.top),
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


def run_baseline(args: argparse.Namespace, model: str) -> dict | None:
    """The --compare baseline, in this process with one thread (as each megagnn rank);
    None for a model that is not SchNet (the baseline has no PaiNN)."""
    import torch

    from megagnn.config import load_config
    from megagnn.profiling import pyg_schnet_step

    cfg = load_config(model, [*args.set, "train.progress=false"])
    if cfg.model.family != "schnet":
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pyg_schnet_step(cfg.model, args.atoms, args.steps)
    finally:
        torch.set_num_threads(threads)


def summarize(model: str, layout: str, ranks: list[dict]) -> dict:
    """Per-layout figures: the slowest rank's time, the largest rank's memory."""
    step = max(r["step_time_s"] for r in ranks)
    first = ranks[0]
    return {
        "model": model,
        "layout": layout,
        "ranks": len(ranks),
        # the whole model's count is known only unsplit; per-rank counts are in "ranks"
        "parameters": first["parameters"] if len(ranks) == 1 else None,
        "step_time_s": step,
        "atoms_per_s": first["atoms"] / step,
        "edges_per_s": first["edges"] / step,
        "matmul_gflop_per_s": sum(r["matmul_flops"] for r in ranks) / step / 1e9,
        "max_parameter_bytes_per_rank": max(r["parameter_bytes"] for r in ranks),
        "max_activation_bytes_per_rank": max(r["activation_bytes"] for r in ranks),
        "max_optimizer_state_bytes_per_rank": max(r["optimizer_state_bytes"] for r in ranks),
        "max_communication_bytes_per_rank": max(
            sum(r["communication_bytes"].values()) for r in ranks
        ),
        "max_peak_host_memory_bytes_per_rank": max(r["peak_host_memory_bytes"] for r in ranks),
        # collective calls one block adds to a step (rank 0; the same on every TP rank)
        "collectives_per_block": first.get("collectives_per_block"),
        **(
            {"max_peak_cuda_memory_bytes_per_rank": max(r["peak_memory_bytes"] for r in ranks)}
            if "peak_memory_bytes" in first
            else {}
        ),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | layout (TPxPP[xDP]) | ranks | step s | atoms/s | matmul GFLOP/s "
        "| params/rank MB (x) | activations/rank MB (x) | optimizer/rank MB | comm/rank MB "
        "| peak host MB | collectives per block (fwd + bwd + force-loss bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        p, a = r["max_parameter_bytes_per_rank"], r["max_activation_bytes_per_rank"]
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['ranks']} | {r['step_time_s']:.3f} "
            f"| {r['atoms_per_s']:.0f} | {r['matmul_gflop_per_s']:.2f} "
            f"| {p / 1e6:.2f} ({p / b['max_parameter_bytes_per_rank']:.2f}) "
            f"| {a / 1e6:.2f} ({a / b['max_activation_bytes_per_rank']:.2f}) "
            f"| {r['max_optimizer_state_bytes_per_rank'] / 1e6:.2f} "
            f"| {r['max_communication_bytes_per_rank'] / 1e6:.2f} "
            f"| {r['max_peak_host_memory_bytes_per_rank'] / 1e6:.0f} "
            f"| {_calls(r.get('collectives_per_block'))} |"
        )
    return "\n".join(lines)


def _calls(calls: dict | None) -> str:
    if calls is None:
        return "n/a"
    return ", ".join(f"{n} {k}" for k, n in sorted(calls.items())) or "none"


def baseline_table(rows: list[dict]) -> str:
    lines = [
        "| model | megagnn params | baseline params | megagnn atoms/s | baseline atoms/s "
        "| speed ratio (megagnn / baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']} | {r['baseline']['parameters']} "
            f"| {r['atoms_per_s']:.0f} | {r['baseline']['atoms_per_s']:.0f} "
            f"| {r['speed_ratio']:.2f} |"
        )
    return "\n".join(lines)


def top_table(raw: dict) -> str:
    parts = []
    for key, ranks in raw.items():
        ops = ranks[0].get("top_operators")
        if ops:
            rows = "\n".join(f"| {o['name']} | {o['calls']} | {o['self_ms']:.1f} |" for o in ops)
            parts.append(f"{key} (rank 0)\n\n| operator | calls | self ms |\n|---|---|---|\n{rows}")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    from tqdm import tqdm

    models = [resolve_model(m) for m in args.model]
    rows, raw, compared = [], {}, []
    jobs = [(m, layout) for m in models for layout in args.layouts]
    for model, layout in tqdm(jobs, desc="runs"):
        name = Path(model).stem
        ranks = run_layout(args, model, layout)
        raw[f"{name} {layout}"] = ranks
        rows.append(summarize(name, layout, ranks))
    if args.compare:
        for model in tqdm(models, desc="baselines"):
            name = Path(model).stem
            base = run_baseline(args, model)
            if base is None:
                print(f"--compare pyg: {name} is not a SchNet model; no baseline", file=sys.stderr)
                continue
            ours = next(r for r in rows if r["model"] == name)
            base["atoms_per_s"] = base["atoms"] / base["step_time_s"]
            compared.append(
                {**ours, "baseline": base, "speed_ratio": ours["atoms_per_s"] / base["atoms_per_s"]}
            )
    text = table(rows)
    if compared:
        text += f"\n\nBaseline ({args.compare}), one thread each:\n\n{baseline_table(compared)}"
    if args.top:
        text += f"\n\n{top_table(raw)}"
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
        doc = {**meta, "summary": rows, "ranks": raw}
        if compared:
            doc["baseline"] = {"kind": args.compare, "rows": compared}
        out.write_text(json.dumps(doc, indent=1))
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        out.with_suffix(".md").write_text(f"{header}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
