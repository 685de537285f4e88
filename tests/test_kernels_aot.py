"""Every Triton kernel compiled ahead of time for Hopper (sm_90), as its launcher launches it
by default and with every entry of its autotuning set (kernels/tuning.py): no GPU needed
(the triton wheel ships ptxas). Catches what the interpreter cannot."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
KERNELS = Path(__file__).parents[1] / "kernels"
SM90_SHARED_LIMIT = 227 * 1024


def kernel_names() -> set[str]:
    """Every launchable @triton.jit function (named *_kernel) in kernels/."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "megagnn.kernels.aot", "--json", "--configs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_in_every_dtype(compiled):
    by_dtype = {}
    for c in compiled:
        by_dtype.setdefault(c["dtype"], set()).add(c["kernel"])
    radial = {n for n in kernel_names() if n.startswith("_radial")}
    assert by_dtype["fp32"] == by_dtype["fp64"] == kernel_names()
    assert by_dtype["bf16"] == kernel_names() - radial  # geometry stays fp32/fp64


# the kernel each autotuning set launches first (the others follow its blocks and warps)
TUNED = {
    "segment_sum_csr": "_csr_sum_kernel",
    "segment_sum_atomic": "_atomic_sum_kernel",
    "cfconv": "_cfconv_kernel",
    "cfconv_backward": "_cfconv_bwd_edges_kernel",
    "painn": "_painn_kernel",
    "painn_backward": "_painn_bwd_edges_kernel",
    "radial": "_radial_fwd_kernel",
}


def test_every_autotuning_entry_is_compiled(compiled):
    from megagnn.kernels.tuning import CONFIGS

    assert set(TUNED) == set(CONFIGS)
    for name, kernel in TUNED.items():
        for dtype in ("fp32", "bf16", "fp64") if name != "radial" else ("fp32", "fp64"):
            seen = {
                (int(c["constexprs"]["BLOCK_E"]), c["num_warps"])
                for c in compiled
                if c["kernel"] == kernel and c["dtype"] == dtype
            }
            for config in CONFIGS[name]:
                assert (config.block_e, config.num_warps or 4) in seen, (name, dtype, config)


def test_resources_fit_sm90_without_spills(compiled):
    for c in compiled:
        where = f"{c['kernel']} {c['dtype']} {c['constexprs']}"
        assert c["shared"] <= SM90_SHARED_LIMIT, where
        assert c["spill_bytes"] == 0, where


def test_fp64_kernels_compute_in_fp64(compiled):
    """A Python float argument reaches compiled code as fp32: an fp64 run would use rounded
    constants (the interpreter keeps them exact, so only compiled code shows it)."""
    for c in compiled:
        if c["dtype"] == "fp64":
            assert c["fp32_params"] == 0 and c["fp32_widenings"] == 0, c["kernel"]


def test_tensor_cores_exactly_where_a_low_precision_dot_is_asked(compiled):
    dotted = [c for c in compiled if c["dot"] != "-"]
    assert {c["dot"] for c in dotted} == {"ieee", "tf32", "bf16"}
    for c in dotted:
        where = f"{c['kernel']} {c['dtype']} dot={c['dot']}"
        if c["dot"] in ("tf32", "bf16"):
            assert c["tensor_core_ops"] > 0, where
        elif c["dtype"] != "fp64":  # IEEE fp32 products stay exact (fp64 has its own mma)
            assert c["tensor_core_ops"] == 0, where
