#!/usr/bin/env python
"""IrrepNet's eager training step on CPU with each model.tensor_product: the written-out
contraction (e3nn) against cuequivariance's plain-PyTorch method (cueq), same weights, same
batch (two rattled 108-atom Cu-Au cells), conservative forces and stress, fp32, one thread.
The implementations alternate repeat by repeat; the median CPU time per step is reported.

    python benchmarks/tensor_product_cpu.py --out benchmarks/results/tensor-product-cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results_io import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    from ase.build import bulk

    from megagnn import keys as K
    from megagnn.config import ModelConfig
    from megagnn.data import atoms_to_graph, collate, to_device
    from megagnn.models import build_model

    torch.set_num_threads(1)
    cells = []
    for seed in (0, 1):
        cell = bulk("Cu", "fcc", a=3.7, cubic=True) * (3, 3, 3)
        cell.numbers[::3] = 79
        cell.rattle(0.1, seed=seed)
        cells.append(atoms_to_graph(cell, 4.0))
    batch = to_device(collate(cells), "cpu", torch.float32)
    models = {}
    for choice in ("e3nn", "cueq"):
        torch.manual_seed(0)
        sizes = dict(hidden=args.hidden, layers=2, num_rbf=8, radial_hidden=32, cutoff=4.0)
        cfg = ModelConfig(family="irrep", correlation=2, tensor_product=choice, **sizes)
        models[choice] = build_model(cfg).train()
    times = {choice: [] for choice in models}
    for _ in range(args.repeats):
        for choice, model in models.items():
            model.zero_grad()
            start = time.process_time()
            out = model(batch)
            loss = (out[K.ENERGY] ** 2).sum() + (out[K.FORCES] ** 2).sum()
            (loss + (out[K.STRESS] ** 2).sum()).backward()
            times[choice].append(time.process_time() - start)
    step = {choice: statistics.median(t) for choice, t in times.items()}
    parameters = sum(p.numel() for p in models["e3nn"].parameters())
    edges = int(batch[K.EDGE_INDEX].shape[1])
    text = (
        f"IrrepNet, {parameters:,} parameters, {edges:,} edges per batch\n\n"
        "| tensor product | step CPU s (median) | relative |\n|---|---:|---:|\n"
        + "".join(f"| {c} | {s:.3f} | {s / step['e3nn']:.2f}x |\n" for c, s in step.items())
    )
    print(text)
    if args.out:
        rows = [{"tensor_product": c, "parameters": parameters, "edges": edges,
                 "step_cpu_s": s, "steps_cpu_s": times[c]} for c, s in step.items()]  # fmt: skip
        write_results(args.out, __file__, argv, "cpu, 1 thread, fp32", {"rows": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
