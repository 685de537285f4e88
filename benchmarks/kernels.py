#!/usr/bin/env python
"""Triton kernels vs their PyTorch references on a GPU: time, achieved bandwidth, speedup.

    python benchmarks/kernels.py --out benchmarks/results/kernels-<device>.json

Bandwidth is reported as a fraction of this device's measured device-to-device copy
bandwidth (a large clone), measured in the same run. Needs CUDA and triton.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from functools import partial

import torch


def bench(fn) -> float:
    """Median milliseconds per call."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    ms = bench(lambda: x.clone())
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s (read + write)


def segment_sum_rows(peak: float) -> list[dict]:
    from megagnn.kernels import segment_sum, segment_sum_reference

    rows = []
    for edges in (100_000, 1_000_000):
        nodes = edges // 32
        for h in (128, 512, 2048):
            for dtype in (torch.float32, torch.bfloat16):
                if edges * h > 1_000_000 * 512:
                    continue
                src = torch.randn(edges, h, device="cuda").to(dtype)
                index = torch.randint(0, nodes, (edges,), device="cuda").sort().values
                size = src.element_size()
                moved = edges * h * size + nodes * h * size + edges * 8
                t_ref = bench(partial(segment_sum_reference, src, index, nodes))
                t_csr = bench(partial(segment_sum, src, index, nodes, is_sorted=True))
                t_atomic = bench(partial(segment_sum, src, index, nodes, is_sorted=False))
                rows.append(
                    {
                        "kernel": "segment_sum",
                        "edges": edges,
                        "H": h,
                        "dtype": str(dtype).removeprefix("torch."),
                        "torch_ms": t_ref,
                        "triton_sorted_ms": t_csr,
                        "triton_atomic_ms": t_atomic,
                        "sorted_bandwidth_fraction": moved / t_csr / 1e6 / peak,
                        "speedup_sorted": t_ref / t_csr,
                        "speedup_atomic": t_ref / t_atomic,
                    }
                )
    return rows


def _radial_step(fn, vec, params) -> None:
    rbf, env = fn(vec, params, 0, 5.0, 6)
    (rbf.sum() + env.sum()).backward()


def radial_rows() -> list[dict]:
    from megagnn.kernels import radial_basis, radial_basis_reference

    rows = []
    for edges in (100_000, 1_000_000, 4_000_000):
        vec = (2 * torch.randn(edges, 3, device="cuda")).requires_grad_()
        params = torch.arange(1, 17, device="cuda") * math.pi / 5.0

        t_ref = bench(partial(_radial_step, radial_basis_reference, vec, params))
        t_k = bench(partial(_radial_step, radial_basis, vec, params))
        rows.append(
            {
                "kernel": "radial_basis fwd+bwd",
                "edges": edges,
                "K": 16,
                "torch_ms": t_ref,
                "triton_ms": t_k,
                "speedup": t_ref / t_k,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write results to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    peak = copy_bandwidth()
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "copy_bandwidth_GBps": peak,
        "rows": segment_sum_rows(peak) + radial_rows(),
    }
    for row in result["rows"]:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
