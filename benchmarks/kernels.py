#!/usr/bin/env python
"""Triton kernels vs their PyTorch references: speed, bandwidth, memory, training steps.

    python benchmarks/kernels.py --out benchmarks/results/kernels-h100.json
    python benchmarks/kernels.py --only fused model
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke    # CPU: tiny sizes, no timings

Sections (each row is measured against its baseline in the same run):
  segment_sum  CSR (sorted, no atomics) and atomic paths vs index_add, and vs torch_scatter's
               segment_csr / scatter_add when it is installed; achieved bandwidth as a
               fraction of this device's measured copy bandwidth (a 1 GiB clone)
  radial       fused basis + envelope, forward + backward, vs the eager reference
  fused        continuous-filter convolution and PaiNN message vs the unfused ops: forward
               and forward + backward time, bytes kept for backward, peak memory
  model        a training step (energy + conservative forces) of SchNet and PaiNN sizes with
               kernels.backend=triton vs torch, fp32 and bf16

Goals: aggregation >= 80% of copy bandwidth; radial >= 3x the eager reference; fused
message >= 2x faster and >= 4x less activation memory than unfused at H >= 512.
--smoke runs every section at toy sizes (on CPU through the Triton interpreter) to check
that the script works; its numbers mean nothing. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("segment_sum", "radial", "fused", "model")
FULL = {
    "segment_sum": dict(edges=(100_000, 1_000_000), H=(128, 512, 2048)),
    "radial": dict(edges=(100_000, 1_000_000, 4_000_000), K=16),
    "fused": dict(edges=(100_000, 1_000_000), H=(128, 512, 1024), K=16, R=64),
    "model": dict(models=("schnet-10m", "mgnn-10m"), atoms=2000, steps=10),
}
SMOKE = {
    "segment_sum": dict(edges=(64,), H=(8,)),
    "radial": dict(edges=(50,), K=8),
    "fused": dict(edges=(64,), H=(8,), K=4, R=8),
    "model": dict(models=("schnet-100k", "mgnn-100k"), atoms=8, steps=1),
}
SMOKE_MODEL = ["model.hidden=8", "model.layers=1", "model.radial_hidden=8", "model.num_rbf=4"]


class Device:
    """Timing and peak memory: CUDA events through triton's do_bench on a GPU; wall-clock
    medians and no memory figure on CPU (smoke runs)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.name = torch.cuda.get_device_name() if self.cuda else f"cpu ({platform.machine()})"
        self.torch = torch.device("cuda" if self.cuda else "cpu")

    def ms(self, fn) -> float:
        """Median milliseconds per call."""
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def peak_bytes(self, fn) -> int | None:
        """Peak memory ``fn`` allocates above what was allocated before it."""
        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def copy_bandwidth(self) -> float | None:
        """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB clone)."""
        if not self.cuda:
            return None
        x = torch.empty(256 * 2**20, device="cuda", dtype=torch.float32)
        return 2 * x.numel() * 4 / self.ms(x.clone) / 1e6


def guarded(fn):
    """Run ``fn``; on a GPU out-of-memory error return the marker instead of failing."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"


def megabytes(n):
    """Bytes as MiB; None and the out-of-memory marker pass through."""
    return n / 2**20 if isinstance(n, int) else n


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def segment_sum_rows(dev: Device, sizes: dict, peak: float | None) -> list[dict]:
    from megagnn.kernels import segment_sum, segment_sum_reference

    try:
        import torch_scatter
    except ImportError:
        torch_scatter = None
    dtypes = (torch.float32, torch.bfloat16) if dev.cuda else (torch.float32,)
    rows = []
    for edges in sizes["edges"]:
        nodes = max(edges // 32, 1)
        for h in sizes["H"]:
            for dtype in dtypes:
                if edges * h > 1_000_000 * 512:
                    continue
                src = torch.randn(edges, h, device=dev.torch).to(dtype)
                index = torch.randint(0, nodes, (edges,), device=dev.torch).sort().values
                size = src.element_size()
                moved = (edges + nodes) * h * size + edges * 8  # read src, index; write out
                row = {"edges": edges, "H": h, "dtype": str(dtype).removeprefix("torch.")}
                row["torch_ms"] = dev.ms(partial(segment_sum_reference, src, index, nodes))
                row["csr_ms"] = dev.ms(partial(segment_sum, src, index, nodes, is_sorted=True))
                row["atomic_ms"] = dev.ms(partial(segment_sum, src, index, nodes, is_sorted=False))
                row["csr_speedup"] = row["torch_ms"] / row["csr_ms"]
                row["atomic_speedup"] = row["torch_ms"] / row["atomic_ms"]
                if peak:
                    row["csr_bandwidth_fraction"] = moved / row["csr_ms"] / 1e6 / peak
                    row["atomic_bandwidth_fraction"] = moved / row["atomic_ms"] / 1e6 / peak
                if torch_scatter is not None and dtype == torch.float32:
                    ptr = torch.searchsorted(index, torch.arange(nodes + 1, device=dev.torch))
                    row["torch_scatter_csr_ms"] = dev.ms(
                        partial(torch_scatter.segment_csr, src, ptr, reduce="sum")
                    )
                    row["csr_vs_torch_scatter"] = row["torch_scatter_csr_ms"] / row["csr_ms"]
                rows.append(row)
    return rows


def _radial_step(fn, vec, params, kind, coeff) -> None:
    rbf, env = fn(vec, params, kind, 5.0, 6, coeff)
    (rbf.sum() + env.sum()).backward()


def radial_rows(dev: Device, sizes: dict) -> list[dict]:
    from megagnn.kernels import radial_basis, radial_basis_reference

    k = sizes["K"]
    bases = {
        "bessel": (torch.arange(1, k + 1) * math.pi / 5.0, 0.0),
        "gaussian": (torch.linspace(0.0, 5.0, k), -0.5 / (5.0 / (k - 1)) ** 2),
    }
    rows = []
    for edges in sizes["edges"]:
        vec = (2 * torch.randn(edges, 3, device=dev.torch)).requires_grad_()
        for name, (params, coeff) in bases.items():
            args = (vec, params.to(dev.torch), 0 if name == "bessel" else 1, coeff)
            row = {"edges": edges, "K": k, "basis": name}
            row["torch_ms"] = dev.ms(partial(_radial_step, radial_basis_reference, *args))
            row["triton_ms"] = dev.ms(partial(_radial_step, radial_basis, *args))
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            rows.append(row)
    return rows


def _fused_inputs(dev: Device, op: str, edges: int, h: int, k: int, r: int) -> tuple:
    """Random receiver-sorted inputs of the continuous-filter convolution or PaiNN message."""
    nodes = max(edges // 32, 2)
    d = dev.torch
    out = 3 * h if op == "painn" else h
    receiver = torch.randint(0, nodes, (edges,), device=d).sort().values
    index = torch.stack([torch.randint(0, nodes, (edges,), device=d), receiver])
    weights = [torch.randn(r, k, device=d) / k**0.5, torch.zeros(r, device=d)]
    weights += [torch.randn(out, r, device=d) / r**0.5, torch.zeros(out, device=d)]
    rbf, env = torch.rand(edges, k, device=d), torch.rand(edges, device=d)
    x = torch.randn(nodes, out, device=d)
    if op == "cfconv":
        return (x, rbf, env, index, nodes, *weights), [x, *weights]
    v = torch.randn(nodes, 3, h, device=d)
    unit = torch.nn.functional.normalize(torch.randn(edges, 3, device=d), dim=-1)
    return (x, v, rbf, env, unit, index, nodes, *weights), [x, v, *weights]


def _forward_backward(fn, args) -> None:
    out = fn(*args)
    sum(t.sum() for t in (out if isinstance(out, tuple) else (out,))).backward()


def fused_rows(dev: Device, sizes: dict) -> list[dict]:
    from megagnn.kernels import cfconv, cfconv_reference, painn_message, painn_message_reference

    from megagnn.profiling import count_saved_activations

    ops = {"cfconv": (cfconv, cfconv_reference), "painn": (painn_message, painn_message_reference)}
    rows = []
    for op, (fused, reference) in ops.items():
        for edges in sizes["edges"]:
            for h in sizes["H"]:
                args, leaves = _fused_inputs(dev, op, edges, h, sizes["K"], sizes["R"])
                for t in leaves:
                    t.requires_grad_()
                row = {"op": op, "edges": edges, "H": h, "K": sizes["K"], "R": sizes["R"]}
                for name, fn in (("unfused", reference), ("fused", fused)):
                    with torch.no_grad():
                        row[f"{name}_fwd_ms"] = guarded(partial(dev.ms, partial(fn, *args)))
                    step = partial(_forward_backward, fn, args)
                    row[f"{name}_fwd_bwd_ms"] = guarded(partial(dev.ms, step))
                    row[f"{name}_peak_MB"] = megabytes(guarded(partial(dev.peak_bytes, step)))
                    with count_saved_activations(torch.nn.Linear(1, 1)) as saved:
                        out = guarded(partial(fn, *args))
                    row[f"{name}_saved_MB"] = megabytes(saved["bytes"] if out != "oom" else out)
                    del out
                    for t in leaves:
                        t.grad = None
                row["fwd_speedup"] = ratio(row["unfused_fwd_ms"], row["fused_fwd_ms"])
                row["fwd_bwd_speedup"] = ratio(row["unfused_fwd_bwd_ms"], row["fused_fwd_bwd_ms"])
                row["saved_memory_ratio"] = ratio(row["unfused_saved_MB"], row["fused_saved_MB"])
                rows.append(row)
    return rows


def model_rows(dev: Device, sizes: dict, smoke: bool) -> list[dict]:
    from megagnn.config import load_config
    from megagnn.parallel.state import ParallelState
    from megagnn.profiling import profile_step

    precisions = ("fp32", "bf16") if dev.cuda else ("fp32",)
    rows = []
    for model in sizes["models"]:
        for precision in precisions:
            row = {"model": model, "precision": precision}
            for kernels in ("torch", "triton"):
                overrides = [f"train.precision={precision}", f"kernels.backend={kernels}"]
                overrides += ["train.progress=false", *(SMOKE_MODEL if smoke else [])]
                cfg = load_config(str(ROOT / "configs" / "model" / f"{model}.yaml"), overrides)
                par = ParallelState(device=dev.torch)
                result = guarded(partial(profile_step, cfg, par, sizes["atoms"], sizes["steps"]))
                if result == "oom":
                    row[f"{kernels}_step_ms"] = "oom"
                    continue
                row.update(atoms=result["atoms"], edges=result["edges"])
                row["parameters"] = result["parameters"]
                row[f"{kernels}_step_ms"] = 1e3 * result["step_time_s"]
                row[f"{kernels}_activations_MB"] = result["activation_bytes"] / 2**20
                if "peak_memory_bytes" in result:
                    row[f"{kernels}_peak_MB"] = result["peak_memory_bytes"] / 2**20
            row["step_speedup"] = ratio(row["torch_step_ms"], row["triton_step_ms"])
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"- {key}: {result[key]}" for key in ("date", "device", "command", "versions")]
    if result["copy_bandwidth_GBps"]:
        lines.append(f"- measured copy bandwidth: {result['copy_bandwidth_GBps']:.0f} GB/s")
    for section, rows in result["sections"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["", f"## {section}", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            cells = (row.get(k, "") for k in keys)
            lines.append(
                "| "
                + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections")
    p.add_argument("--smoke", action="store_true", help="toy sizes: check the script runs")
    p.add_argument("--out", help="write results to this JSON file (and a .md beside it)")
    args = p.parse_args(argv)
    dev = Device()
    if not dev.cuda and not args.smoke:
        print("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import triton

    sizes = SMOKE if args.smoke else FULL
    peak = dev.copy_bandwidth()
    runners = {
        "segment_sum": lambda: segment_sum_rows(dev, sizes["segment_sum"], peak),
        "radial": lambda: radial_rows(dev, sizes["radial"]),
        "fused": lambda: fused_rows(dev, sizes["fused"]),
        "model": lambda: model_rows(dev, sizes["model"], args.smoke),
    }
    result = {
        "date": date.today().isoformat(),
        "device": dev.name,
        "command": " ".join(["benchmarks/kernels.py", *sys.argv[1:]]),
        "versions": f"torch {torch.__version__}, triton {triton.__version__}",
        "copy_bandwidth_GBps": peak,
        "sections": {},
    }
    for section in args.only:
        rows = runners[section]()
        result["sections"][section] = rows
        for row in rows:
            print(json.dumps({"section": section, **row}), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
