import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagnn.config import load_config
from megagnn.parallel.state import ParallelState
from megagnn.profiling import count_saved_activations, profile_step


def test_profile_step_reports_a_training_step():
    cfg = load_config(None, ["model.hidden=8", "model.layers=1", "model.cutoff=3.0"])
    out = profile_step(cfg, ParallelState(device=torch.device("cpu")), n_atoms=32, steps=1)
    assert out["atoms"] == 32 and out["edges"] > 0
    assert out["parameter_bytes"] == 4 * out["parameters"] > 0
    assert out["activation_bytes"] > 0 and out["matmul_flops"] > 0
    assert out["communication_bytes"] == {}  # one process talks to nobody
    # AdamW: two moments per parameter (plus a step count per tensor)
    assert 2 * out["parameter_bytes"] <= out["optimizer_state_bytes"] < 3 * out["parameter_bytes"]


def test_communication_counter_sees_tensors_passed_by_keyword():
    import torch.distributed as dist

    from megagnn.checkpoint.sharded import dist_checkpointing
    from megagnn.profiling import count_communication

    dist_checkpointing()  # a one-rank gloo group
    t = torch.zeros(10)
    with count_communication() as counts:
        dist.broadcast(tensor=t, src=0)  # as torch's ZeroRedundancyOptimizer calls it
        dist.all_reduce(t)
        dist.all_reduce(t)
    assert counts.bytes == {"broadcast": 40, "all_reduce": 80}
    assert counts.calls == {"broadcast": 1, "all_reduce": 2}


def test_activation_counter_tracks_the_peak_not_the_sum():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)
    with count_saved_activations(torch.nn.Linear(1, 1)) as one:
        (torch.tanh(x @ w)).sum().backward()
    with count_saved_activations(torch.nn.Linear(1, 1)) as two:
        for _ in range(2):  # the first graph is freed before the second is built
            (torch.tanh(x @ w)).sum().backward()
    assert one["bytes"] > 0 and two["bytes"] == one["bytes"]


def test_kernel_benchmark_script_runs(tmp_path):
    """benchmarks/kernels.py at toy sizes through the Triton interpreter: every section
    produces rows and the JSON and Markdown results (what a GPU run writes) come out."""
    pytest.importorskip("triton")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"
    out = tmp_path / "kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(script), "--smoke", "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["sections"]) == {"segment_sum", "radial", "fused", "model"}
    assert all(result["sections"].values())
    for row in result["sections"]["fused"]:  # the fused ops keep no per-edge tensor
        assert row["saved_memory_ratio"] > 4
    assert "| op | edges | H |" in out.with_suffix(".md").read_text()
