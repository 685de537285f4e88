"""Run a module or script under torchrun on CPU (gloo) from a test."""

import os
import subprocess
import sys


def torchrun(nproc: int, *args: str, timeout: int = 300) -> str:
    """Launch ``torchrun --standalone`` with ``args``; fail the test with the output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout
