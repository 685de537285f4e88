"""Compile every kernel ahead of time for a GPU that is not here, as the launchers launch it.

    python -m megagnn.kernels.aot            # a table, sm_90
    python -m megagnn.kernels.aot --json     # one record per launch
    python -m megagnn.kernels.aot --configs  # every autotuning entry (kernels/tuning.py)

The interpreter (CPU tests) runs kernels as Python and hides what only compiled code shows.
This drives every launcher on small CPU tensors (fp32, bf16, fp64; forward and backward)
with Triton's launch replaced by a recorder, then compiles each distinct launch with
``triton.compile`` for ``sm_<arch>`` using the ptxas inside the triton wheel: no GPU and no
CUDA driver needed. ``TRITON_INTERPRET`` must be unset. Per launch it reports the shared
memory, registers and spills (``ptxas -v``), the PTX's fp32 kernel parameters (an fp64
launch must have none: a Python float argument is passed as fp32) and its tensor-core
instructions (``mma``/``wgmma``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
_DTYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}


@dataclass
class Launch:
    """One distinct launch: the kernel and the types and constexprs it was given."""

    kernel: str
    dtype: str  # the data dtype the launcher was driven with
    signature: dict
    constexprs: dict
    options: dict  # launch options (num_warps, num_stages) the launcher set


@dataclass
class Compiled:
    kernel: str
    dtype: str
    constexprs: dict
    shared: int  # bytes
    registers: int
    spill_bytes: int  # spill stores + loads, from ptxas -v
    fp32_params: int  # .param .f32 in the kernel's PTX signature
    fp32_widenings: int  # cvt.f64.f32 in the PTX: an fp32 value entering fp64 arithmetic
    tensor_core_ops: int  # mma.sync / wgmma instructions in the PTX
    dot: str  # the dot precision of the launch ("ieee", "tf32", "bf16"; "-" without dots)
    num_warps: int


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"  # what Triton's JIT passes for a Python float
    raise TypeError(f"cannot type a kernel argument {value!r}")


def record_launches(drive) -> list[tuple]:
    """Run ``drive()`` with every JIT launch recorded instead of run: (fn, args, kwargs)."""
    from triton.runtime.jit import JITFunction

    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = run
    try:
        drive()
    finally:
        JITFunction.run = original
    return launches


def _as_launch(fn, args, kwargs, dtype: str) -> Launch:
    params = fn.params
    values = dict(zip((p.name for p in params), args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for p in params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = _arg_type(values[p.name])
    options = {k: v for k, v in kwargs.items() if k not in signature}
    return Launch(fn.__name__, dtype, signature, constexprs, options)


def _drive(dtype: torch.dtype) -> None:
    """Every launcher, forward and backward, on a small graph in ``dtype``."""
    from . import aggregate, continuous_filter, equivariant_message, radial

    g = torch.Generator().manual_seed(0)
    n, e, h, k, r = 7, 40, 256, 8, 16  # H: wide enough for every channel block
    receiver = torch.sort(torch.randint(0, n, (e,), generator=g)).values
    sender = torch.randint(0, n, (e,), generator=g)
    index = torch.stack([sender, receiver])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    src = rand(e, h)
    for is_sorted in (True, False):
        aggregate.segment_sum(src, receiver, n, is_sorted)
    x, rbf, env = rand(n, h), rand(e, k), rand(e)
    w1, b1, w2, b2 = rand(r, k), rand(r), rand(h, r), rand(h)
    out = continuous_filter.cfconv(x, rbf, env, index, n, w1, b1, w2, b2)
    torch.autograd.grad(out.sum(), (x, rbf, env, w1, b1, w2, b2))
    phi, v, w2m, b2m = rand(n, 3 * h), rand(n, 3, h), rand(3 * h, r), rand(3 * h)
    unit = torch.randn(e, 3, generator=g).to(dtype)
    s, vec_out = equivariant_message.painn_message(
        phi, v, rbf, env, unit, index, n, w1, b1, w2m, b2m
    )
    torch.autograd.grad((s.sum() + vec_out.sum()), (phi, v, rbf, env, w1, b1, w2m, b2m))
    if dtype != torch.bfloat16:  # geometry is fp32 or fp64
        vec = (torch.randn(e, 3, generator=g) * 2).to(dtype).requires_grad_()
        for kind, params, coeff in (
            (radial.BESSEL, rand(k), 0.0),
            (radial.GAUSSIAN, rand(k), -2.0),
        ):
            basis, envelope = radial.radial_basis(vec, params.detach(), kind, 5.0, 6, coeff)
            torch.autograd.grad((basis.sum() + envelope.sum()), vec)


# the dot precisions each data dtype launches with (fp64 always multiplies in fp64)
DOTS = {torch.float32: ("ieee", "tf32"), torch.bfloat16: ("ieee", "bf16"), torch.float64: ("ieee",)}


def launches(
    dtypes=(torch.float32, torch.bfloat16, torch.float64), configs: bool = False
) -> list[tuple]:
    """Distinct (JITFunction, Launch) pairs over ``dtypes`` and their dot precisions, as
    the launchers make them by default, or with ``configs`` for every entry of their
    autotuning sets (``tuning.CONFIGS``)."""
    from . import common, tuning

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    seen, out = set(), []
    entries = range(tuning.set_sizes()) if configs else (0,)
    for dtype, dot, entry in ((d, x, i) for d in dtypes for x in DOTS[d] for i in entries):
        common.set_dot_precision(dot)
        try:
            with tuning.forcing(entry):
                recorded = record_launches(lambda d=dtype: _drive(d))
        finally:
            common.set_dot_precision("ieee")
        for fn, args, kwargs in recorded:
            launch = _as_launch(fn, args, kwargs, _DTYPES[dtype])
            key = repr([launch.kernel, launch.signature, launch.constexprs, launch.options])
            if key not in seen:
                seen.add(key)
                out.append((fn, launch))
    return out


def _ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the PTX's kernel, from the bundled ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", "-v", str(src),
             "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = out.stdout + out.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(
        int(a) + int(b)
        for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    )
    return regs, spills


def compile_launch(fn, launch: Launch, arch: int = 90) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(
        fn=fn, signature=launch.signature, constexprs=launch.constexprs
    )
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch.options)
    ptx = kernel.asm["ptx"]
    entry = ptx[ptx.index(".entry") : ptx.index(")", ptx.index(".entry"))]
    regs, spills = _ptxas(ptx, arch)
    return Compiled(
        kernel=launch.kernel,
        dtype=launch.dtype,
        constexprs={k: str(v) for k, v in launch.constexprs.items()},
        shared=int(kernel.metadata.shared),
        registers=regs,
        spill_bytes=spills,
        fp32_params=len(re.findall(r"\.param \.f32", entry)),
        fp32_widenings=len(re.findall(r"cvt\.f64\.f32", ptx)),
        tensor_core_ops=len(re.findall(r"^\s*(?:mma\.sync|wgmma\.mma_async)", ptx, re.M)),
        dot={0: "ieee", 1: "tf32", 2: "bf16"}.get(launch.constexprs.get("DOT"), "-"),
        num_warps=kernel.metadata.num_warps,
    )


_TO_COMPILE: list[tuple] = []  # what forked workers of compile_all compile, by index


def _compile_one(i: int, arch: int) -> Compiled:
    return compile_launch(*_TO_COMPILE[i], arch)


def compile_all(
    arch: int = 90, workers: int | None = None, configs: bool = False
) -> list[Compiled]:
    """Every launch (with ``configs``, of every autotuning entry) compiled, in order, by
    ``workers`` forked processes (default: one per CPU; triton.compile and ptxas hold one
    core each)."""
    _TO_COMPILE[:] = launches(configs=configs)
    workers = min(workers or os.cpu_count() or 1, len(_TO_COMPILE))
    if workers <= 1:
        return [_compile_one(i, arch) for i in range(len(_TO_COMPILE))]
    # fork: the workers inherit the recorded launches (JIT functions do not pickle)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.starmap(_compile_one, [(i, arch) for i in range(len(_TO_COMPILE))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2]
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    p.add_argument("--json", action="store_true", help="print one JSON record per launch")
    p.add_argument(
        "--configs",
        action="store_true",
        help="every entry of every autotuning set (kernels/tuning.py), not only the defaults",
    )
    p.add_argument("--workers", type=int, default=None, help="compiling processes (default: CPUs)")
    args = p.parse_args(argv)
    results = compile_all(args.arch, args.workers, args.configs)
    if args.json:
        print(json.dumps([asdict(c) for c in results]))
        return 0
    columns = ("num_warps", "shared", "registers", "spill_bytes", "fp32_params")
    columns += ("fp32_widenings",)
    columns += ("tensor_core_ops",)
    print(f"{'kernel':<28} {'dtype':<5} {'dot':<5} " + " ".join(f"{c:>15}" for c in columns))
    for c in results:
        row = asdict(c)
        head = f"{c.kernel:<28} {c.dtype:<5} {c.dot:<5} "
        print(head + " ".join(f"{row[k]:>15}" for k in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
