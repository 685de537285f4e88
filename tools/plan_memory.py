#!/usr/bin/env python
"""Which layouts fit: memory per rank of a model size on N GPUs, before anything runs.

    python tools/plan_memory.py --model mgnn-1b --gpus 8 --gpu-memory 80 --atoms 4096

For every tensor x pipeline x data split of the GPUs (and with activation recompute when
--recompute), the busiest rank's weights, gradients, AdamW moments (sharded over the data-
parallel ranks, parallel.shard_optimizer), weight average (--ema) and one step's
activations for a batch of --atoms atoms per data-parallel rank (an fcc CuAu cell at the
model's cutoff; --edges rescales its density to that many edges). Parameters are counted
exactly (the model cut on the meta device), activations from a fit to small models of the
same config measured on this machine (megagnn.planning), FLOPs counted on the meta device;
atoms/s assume each GPU sustains --mfu of --peak-tflops. Layouts that fit --gpu-memory
(less --reserve for the framework) come first, fastest first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def model_config(spec: str):
    from megagnn.config import load_config

    path = Path(spec)
    if not path.is_file():
        path = ROOT / "configs" / "model" / f"{spec}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
        raise SystemExit(f"--model {spec}: no such file or size; sizes: {', '.join(names)}")
    return load_config(path).model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a configs/model size (mgnn-1b) or a YAML")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the run")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument(
        "--reserve",
        type=float,
        default=4.0,
        help="GiB per GPU kept for the "
        "framework (CUDA context, allocator slack, communication buffers)",
    )
    p.add_argument("--atoms", type=int, default=4096, help="atoms per batch per data rank")
    p.add_argument("--edges", type=int, help="edges per batch (default: the fcc cell's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp64"], default="bf16")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--recompute", action="store_true", help="also plan recompute layouts")
    p.add_argument("--ema", action="store_true", help="keep a weight average (optim.ema_decay)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="per GPU (default: H100 SXM dense bf16)"
    )
    p.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak sustained")
    p.add_argument("--json", help="also write every layout's numbers here")
    args = p.parse_args(argv)

    from megagnn import planning
    from megagnn.models import build_model, count_parameters

    cfg = model_config(args.model)
    total = count_parameters(build_model(cfg, device="meta"))
    batch = planning.cell_batch(args.atoms, cfg.cutoff)
    if args.edges:
        edges = int(batch["edge_index"].shape[1])
        batch = planning.cell_batch(args.atoms, cfg.cutoff, (edges / args.edges) ** (1 / 3))
    print(
        f"{args.model}: {total:,} parameters; calibrating activations on small "
        f"{cfg.family} models ...",
        file=sys.stderr,
    )
    activations = planning.ActivationModel.calibrate(cfg, args.precision)
    budget = (args.gpu_memory - args.reserve) * planning.GIB
    rows = []
    for layout in planning.layouts(cfg, args.gpus, args.recompute):
        row = planning.plan(
            cfg, layout, batch, activations, args.precision, args.ema, args.microbatches
        )
        row["fits"] = row["total_bytes"] <= budget
        row["atoms_per_s"] = planning.estimated_atoms_per_s(
            row, row["atoms"], layout, args.peak_tflops * 1e12, args.mfu
        )
        rows.append(row)
    rows.sort(key=lambda r: (not r["fits"], -r["atoms_per_s"]))
    g = planning.GIB
    print(
        f"\n{args.model} ({total:,} parameters) on {args.gpus} x {args.gpu_memory:g} GiB, "
        f"{args.precision}, {rows[0]['atoms']} atoms / {rows[0]['edges']} edges per batch "
        f"per data rank (fit of activations within {100 * activations.residual:.1f}% on "
        "its own measurements):\n"
    )
    print(
        "| layout | params/rank | weights+grads GiB | AdamW GiB | activations GiB "
        "| total GiB | fits | est. atoms/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['parameters_per_rank'] / 1e6:.1f}M "
            f"| {(r['weights_bytes'] + r['gradients_bytes']) / g:.1f} "
            f"| {r['optimizer_bytes'] / g:.1f} | {r['activation_bytes'] / g:.1f} "
            f"| {r['total_bytes'] / g:.1f} | {'yes' if r['fits'] else 'no'} "
            f"| {r['atoms_per_s']:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0 if any(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
