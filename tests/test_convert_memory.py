"""Checkpoint conversion streams: consolidating holds about one tensor at a time."""

import json
import subprocess
import sys

from test_training import tiny_config

from megagnn.training.trainer import Trainer

# consolidate in a fresh process, its resident memory read just before (the baseline, with
# megatron-core's checkpointing imported) and its peak after (VmHWM: after exec, Linux's
# ru_maxrss starts from the parent's resident memory at fork, here pytest's)
CONSOLIDATE = """
import json, sys
import megatron.core.dist_checkpointing
from megagnn.convert import consolidate
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
consolidate(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps(status("VmHWM:") - base))
"""


def test_consolidation_peak_is_at_most_twice_the_largest_tensor(emt_dataset, tmp_path):
    # a SchNet whose [2048, 2048] weights (16.8 MB each) make most of its 111 MB
    wide = ["model.family=schnet", "model.hidden=2048", "train.max_steps=1"]
    Trainer(tiny_config(emt_dataset, tmp_path / "run", *wide)).train()
    out = subprocess.run(
        [sys.executable, "-c", CONSOLIDATE, str(tmp_path / "run"), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    largest = 2048 * 2048 * 4
    total = (tmp_path / "one" / "model.safetensors").stat().st_size
    assert total > 5 * largest  # so that holding the model would fail the test
    # the tensor and the saved shard it is assembled from (here the whole tensor, saved by
    # one rank), plus what reading the first one imports and allocates once (~7 MB)
    assert peak <= 2 * largest + 16e6, f"peak {peak / 1e6:.1f} MB above baseline"
