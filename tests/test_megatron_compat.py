"""megatron-core imported and used for checkpoints without the costs of parts megagnn does
not use (megagnn/parallel/megatron_compat.py): no dynamo for its fusions, no spawned
Manager process for the results of a synchronous save."""

import subprocess
import sys

SCRIPT = """
import multiprocessing, sys, torch
from megagnn.checkpoint import sharded as checkpoint
dc = checkpoint.dist_checkpointing()
assert "torch._dynamo" not in sys.modules, "megatron-core's fusions were compiled"
from megatron.core.dist_checkpointing import ShardedTensor
state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0))}
dc.save(state, sys.argv[1])
assert not multiprocessing.active_children(), multiprocessing.active_children()
loaded = dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(6))}, sys.argv[1])
assert torch.equal(loaded["w"], torch.arange(6.0)), loaded
"""


def test_checkpoints_without_dynamo_or_a_manager_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
