#!/usr/bin/env python
"""Compiled against eager training steps (train.compile), per family and size, on real
batches: conservative forces and stress, fp32, one thread per process.

    python benchmarks/compile_step.py --models schnet=schnet-100k painn=mgnn-100k \\
        egnn=egnn-100k irrep=irrep-100k --data emt xtb --steps 20 \\
        --out benchmarks/results/compile-cpu

Each (data, model, mode) runs in a process of its own (peak memory is per process): the
Trainer of an ordinary run is built on the data, its first --steps training batches are
read once, one step compiles (compiled mode, with an empty Inductor cache) or warms up
(eager), then the same batches are stepped through and timed. Batches vary in atoms and
edges from step to step, so the compiled graph's dynamic sizes are exercised; both modes
step through the same batches, so their times compare. Data: emt
(tools/generate_emt_data.py, periodic alloys) and xtb (tools/generate_xtb_data.py:
molecules, clusters and crystals), generated and preprocessed under --work when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from results_io import write_results

if TYPE_CHECKING:
    from megagnn.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DEVICE = f"{os.cpu_count()}-core x86-64 CPU, one process of one thread at a time"
GENERATORS = {"emt": "tools/generate_emt_data.py", "xtb": "tools/generate_xtb_data.py"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["schnet=schnet-100k", "painn=mgnn-100k", "egnn=egnn-100k", "irrep=irrep-100k"],
        help="FAMILY=SIZE pairs (sizes from configs/model/)",
    )
    p.add_argument("--data", nargs="+", default=["emt", "xtb"], choices=sorted(GENERATORS))
    p.add_argument("--structures", type=int, default=400, help="structures per dataset")
    p.add_argument("--max-atoms", type=int, default=256, help="data.max_atoms of the batches")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after the first)")
    p.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend of the compiled rows (aot_eager: the traced graph run by "
        "eager kernels, which separates the trace's cost from Inductor's code)",
    )
    p.add_argument("--work", default="runs/compile-bench", help="data and scratch folder")
    p.add_argument("--out", help="results stem: OUT.json and OUT.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one row, as JSON
    return p.parse_args(argv)


def ensure_data(name: str, work: Path, structures: int) -> Path:
    processed = work / name / "processed"
    if (processed / "dataset.json").is_file():
        return processed
    raw = work / name / "raw.extxyz"
    if not raw.is_file():
        cmd = [sys.executable, GENERATORS[name], "-o", str(raw), "-n", str(structures)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    cmd = [sys.executable, "tools/preprocess_data.py", str(raw), "-o", str(processed)]
    subprocess.run([*cmd, "--cutoff", "5.0"], check=True, cwd=ROOT)
    return processed


def trainer_for(size: str, data, max_atoms: int, compile: bool, scratch) -> Trainer:
    """The Trainer of an ordinary run of configs/model/SIZE.yaml on ``data``: conservative
    forces and stress, no validation, its run folder under ``scratch``."""
    from megagnn.config import load_config
    from megagnn.training.trainer import Trainer

    overrides = [
        f"data.path={data}",
        f"data.max_atoms={max_atoms}",
        f"train.compile={str(compile).lower()}",
        "model.forces=conservative",
        "model.stress=true",
        "validate.every=0",
        "train.progress=false",
        f"train.out_dir={scratch}/run",
    ]
    return Trainer(load_config(ROOT / "configs/model" / f"{size}.yaml", overrides))


def run_worker(spec: dict) -> dict:
    """One row: build the run, step --steps batches after a first (compiling) step."""
    import functools

    import torch

    from megagnn.models.compiled import CompiledForward
    from megagnn.training import trainer as trainer_module

    torch.set_num_threads(1)
    backend = spec.get("backend", "inductor")
    trainer_module.CompiledForward = functools.partial(CompiledForward, backend=backend)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(spec["size"], spec["data"], spec["max_atoms"], spec["compile"], tmp)
        stream = trainer.sources[0].batches()
        batches = [next(stream) for _ in range(spec["steps"] + 1)]
        started = time.perf_counter()
        trainer.train_step(batches[0:1])  # compiles (or warms up)
        first = time.perf_counter() - started
        times = []
        for batch in batches[1:]:
            started = time.perf_counter()
            trainer.train_step([batch])
            times.append(time.perf_counter() - started)
    return {
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "first_step_s": first,
        "compile_s": getattr(trainer.forward, "compile_s", 0.0),
        "step_s": sum(times) / len(times),
        "median_step_s": statistics.median(times),
        "atoms_per_step": sum(int(b["n_atoms"].sum()) for b in batches[1:]) / len(times),
        "structures_per_step": sum(len(b["n_atoms"]) for b in batches[1:]) / len(times),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_row(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps({**spec, "out": str(out)})]
        # a cold compile: Inductor's on-disk cache would make a rerun's compile time seconds
        env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(out.read_text())


def eager_and_compiled(
    data: Path, size: str, max_atoms: int, steps: int, backend: str = "inductor"
) -> tuple[dict, dict]:
    """The eager and the compiled row of one model size on the same batches."""
    spec = {"data": str(data), "size": size, "max_atoms": max_atoms}
    spec.update(steps=steps, backend=backend)
    return run_row({**spec, "compile": False}), run_row({**spec, "compile": True})


def table(rows: list[dict]) -> str:
    lines = [
        "| data | family | parameters | eager step (s) | compiled step (s) | speedup | "
        "compile (s) | graphs | mean step eager / compiled (s) | peak RSS eager / compiled (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['family']} ({r['size']}) | {r['parameters']:,} | "
            f"{r['eager_step_s']:.3f} | {r['compiled_step_s']:.3f} | "
            f"{r['eager_step_s'] / r['compiled_step_s']:.2f}x | {r['compile_s']:.0f} | "
            f"{r['compiled_graphs']} | "
            f"{r['eager_mean_step_s']:.3f} / {r['compiled_mean_step_s']:.3f} | "
            f"{r['eager_peak_rss_bytes'] / 1e6:,.0f} / {r['compiled_peak_rss_bytes'] / 1e6:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["out"]).write_text(json.dumps(run_worker(spec)))
        return 0
    work = ROOT / args.work
    rows = []
    for name in args.data:
        data = ensure_data(name, work, args.structures)
        for pair in args.models:
            family, _, size = pair.partition("=")
            eager, compiled = eager_and_compiled(
                data, size, args.max_atoms, args.steps, args.backend
            )
            row = {
                "data": name,
                "family": family,
                "size": size,
                "parameters": eager["parameters"],
                "atoms_per_step": eager["atoms_per_step"],
                "eager_step_s": eager["median_step_s"],
                "compiled_step_s": compiled["median_step_s"],
                "compile_s": compiled["compile_s"],
                "compiled_graphs": compiled["graphs"],
                "eager_mean_step_s": eager["step_s"],
                "compiled_mean_step_s": compiled["step_s"],
                "eager_peak_rss_bytes": eager["peak_rss_bytes"],
                "compiled_peak_rss_bytes": compiled["peak_rss_bytes"],
            }
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    if args.out:
        write_results(
            args.out,
            __file__,
            argv,
            DEVICE,
            {"rows": rows},
            table(rows),
            protocol="conservative forces and stress, fp32, the same batches eager and "
            f"compiled ({args.backend}), {args.steps} timed steps after the first; step: the "
            "median; graphs: compiled graphs (more than 1: a batch recompiled, which the mean "
            "step time includes)",
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
