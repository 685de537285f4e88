"""Tensor/data-parallel equivalence with the unsharded model, on CPU with gloo.

Each layout runs tests/distributed/worker.py under torchrun; the worker asserts outputs,
loss, every gradient (conservative-force loss included), the clipped norm and one AdamW
step against the single-device model built from the same seed on each rank.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")


@pytest.mark.parametrize("nproc, tensor", [(2, 2), (2, 1), (4, 2)], ids=["tp2", "dp2", "tp2xdp2"])
def test_parallel_matches_single_process(nproc, tensor, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(WORKER),
        "--tensor",
        str(tensor),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "PARALLEL CHECKS PASSED" in proc.stdout
