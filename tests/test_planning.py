"""The memory planner against what a training step really holds, per rank."""

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megagnn import planning
from megagnn.config import ModelConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from plan_memory import main as plan_main  # noqa: E402


@pytest.fixture(autouse=True)
def no_process_group():
    """The planner cuts models under a fake process group of its own: a one-rank group that
    an earlier test of this worker left (in-process checkpointing) is taken down first."""
    if dist.is_initialized():
        from megagnn.parallel.megatron_compat import import_megatron

        import_megatron().parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def small(family="painn", **changes):
    base = dict(family=family, hidden=16, layers=2, num_rbf=8, radial_hidden=16, cutoff=4.0)
    return ModelConfig(**{**base, **changes})


@pytest.mark.parametrize("family", ["painn", "irrep"])
def test_predicted_rank_memory_is_within_15_percent_of_measured(family):
    """Calibrated on widths 8-16 and depths 1-2, predicted at other widths, depths, batch
    sizes, densities and tensor sizes, with and without recompute: weights, gradients,
    AdamW moments and activations of rank 0, measured on real tensors."""
    cfg = small(family)
    activations = planning.ActivationModel.calibrate(cfg)
    cases = [  # hidden, layers, atoms, spacing, tensor, recompute
        (32, 3, 108, 1.0, 1, False),
        (48, 2, 256, 1.15, 2, False),
        (24, 4, 108, 1.3, 1, True),
        (64, 2, 32, 1.0, 4, False),
        (32, 3, 256, 1.0, 2, True),
        (40, 5, 108, 1.1, 1, False),
    ]
    for hidden, layers, atoms, spacing, tensor, recompute in cases:
        c = small(family, hidden=hidden, layers=layers)
        batch = planning.cell_batch(atoms, c.cutoff, spacing)
        m = planning.measure_step(c, batch, tensor, recompute)
        measured = sum(m[k] for k in ("activation_bytes", "weight_bytes", "gradient_bytes"))
        measured += m["optimizer_bytes"]
        layout = planning.Layout(tensor, 1, 1, recompute=recompute)
        row = planning.plan(c, layout, batch, activations)
        assert row["parameters_per_rank"] == m["parameters"]  # exact
        assert row["weights_bytes"] + row["gradients_bytes"] == m["weight_bytes"] * 2
        assert row["optimizer_bytes"] == m["optimizer_bytes"]
        assert row["total_bytes"] == pytest.approx(measured, rel=0.15), (hidden, layers, tensor)
        assert row["flops_per_step"] == m["flops"]  # counted on the meta device: exact


def test_state_bytes_follow_megatrons_accounting():
    layout = planning.Layout(1, 1, 8, shard_optimizer=True)
    state = planning.state_bytes(10**6, layout, "fp32", ema=False)
    assert sum(state.values()) / 10**6 == 4 + 4 + 8 / 8  # weights, grads, moments over 8
    unsharded = planning.state_bytes(
        10**6, planning.Layout(1, 1, 8, shard_optimizer=False), "fp32", True
    )
    assert sum(unsharded.values()) / 10**6 == 4 + 4 + 8 + 4


def test_pipeline_stages_split_the_parameters_and_conservative_forces_take_none():
    cfg = small(forces="direct", stress=False, layers=4)
    whole = planning.stage_parameters(cfg, 1, 1)[0]
    stages = planning.stage_parameters(cfg, 1, 2)
    assert sum(stages) == whole and 0 < stages[0] < whole
    assert all(l.pipeline == 1 for l in planning.layouts(small(), 8, recompute=False))
    assert any(l.pipeline > 1 for l in planning.layouts(cfg, 8, recompute=False))


def test_the_tool_prints_layouts_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--model", "mgnn-100k", "--gpus", "2", "--atoms", "64", "--json", str(out)]
    assert plan_main([*args, "--gpu-memory", "8", "--recompute"]) == 0
    text = capsys.readouterr().out
    assert "| TP1 x PP1 x DP2 |" in text and "| TP2 x PP1 x DP1 + recompute |" in text
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["fits"] and all(r["total_bytes"] > r["activation_bytes"] > 0 for r in rows)
