"""Checkpoint conversion streams: consolidating holds about one tensor at a time."""

import json
import subprocess
import sys
from pathlib import Path

from test_training import tiny_config

from megagnn.training.trainer import Trainer

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"


def test_consolidation_peak_is_at_most_twice_the_largest_tensor(emt_dataset, tmp_path):
    # a SchNet whose [2048, 2048] weights (16.8 MB each) make most of its 111 MB
    wide = ["model.family=schnet", "model.hidden=2048", "train.max_steps=1"]
    Trainer(tiny_config(emt_dataset, tmp_path / "run", *wide)).train()
    # in a fresh process, which reads its own peak above its resident memory before
    report = tmp_path / "memory.json"
    cmd = [sys.executable, str(TOOL), "consolidate", str(tmp_path / "run"), str(tmp_path / "one")]
    subprocess.run([*cmd, "--memory-report", str(report), "--no-progress"], check=True)
    peak = json.loads(report.read_text())["peak_above_baseline_bytes"]
    largest = 2048 * 2048 * 4
    total = (tmp_path / "one" / "model.safetensors").stat().st_size
    assert total > 5 * largest  # so that holding the model would fail the test
    # the tensor and the saved shard it is assembled from (here the whole tensor, saved by
    # one rank), plus what reading the first one imports and allocates once (~7 MB)
    assert peak <= 2 * largest + 16e6, f"peak {peak / 1e6:.1f} MB above baseline"
