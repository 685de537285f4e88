"""``torchrun -m megagnn.pretrain`` with tensor, pipeline and data parallelism, on CPU (gloo)."""

import json

import pytest
import torch
from ase.build import bulk
from launch import torchrun

from megagnn.data import atoms_to_graph, collate, to_device
from megagnn.inference.calculator import load_model

DT = torch.float64


def pretrain(nproc, out, dataset, *overrides):
    return torchrun(
        nproc,
        "-m",
        "megagnn.pretrain",
        "--set",
        f"data.path={dataset}",
        f"train.out_dir={out}",
        "model.hidden=16",
        "model.layers=2",
        "model.num_rbf=8",
        "model.radial_hidden=8",
        "model.cutoff=4.0",
        "data.max_atoms=64",
        "data.split=[0.7, 0.15, 0.15]",
        "train.precision=fp64",
        "train.log_every=1",
        "train.eval_every=0",
        "train.progress=false",
        "train.warmup_steps=2",
        *overrides,
    )


def losses(out):
    """(step, loss) in the order logged; a resumed run appends its steps again."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss/total"]) for r in map(json.loads, lines)]


DIRECT = ("model.forces=direct", "model.stress=false")
# name: (the split, the run's other settings)
LAYOUTS = {
    "schnet-tp2": ("tensor", ("model.family=schnet",)),
    "painn-tp2": ("tensor", ("model.family=painn",)),
    # two 1F1B microbatches per step, gradients accumulated over them
    "painn-pp2": ("pipeline", ("model.family=painn", "train.microbatches=2", *DIRECT)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_training_matches_one_process(emt_dataset, tmp_path, layout):
    kind, model = LAYOUTS[layout]
    split = f"parallel.{kind}=2"
    single = tmp_path / "single"
    pretrain(1, single, emt_dataset, *model, "train.max_steps=4")
    par = tmp_path / "parallel"
    pretrain(2, par, emt_dataset, *model, split, "train.max_steps=4")
    a, b = losses(single), losses(par)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step
    # the sharded checkpoint loads into one process: the same model as the one-process run
    batch = to_device(collate([atoms_to_graph(bulk("Cu", "fcc", a=3.6) * 2, 4.0)]), "cpu", DT)
    one, split_run = load_model(single), load_model(par)
    for key, value in one(batch).items():
        torch.testing.assert_close(split_run(batch)[key], value, rtol=1e-7, atol=1e-10)


def test_resume_reproduces_the_data_parallel_run(emt_dataset, tmp_path):
    args = ("train.max_steps=4", "train.save_every=2")
    pretrain(2, tmp_path, emt_dataset, *args)
    first = losses(tmp_path)
    # as if the job had died after the step-2 checkpoint
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    out = pretrain(2, tmp_path, emt_dataset, *args)
    assert "resumed from" in out
    again = losses(tmp_path)[len(first) :]
    assert again == first[2:]  # steps 3 and 4, bit for bit


def test_resume_under_another_layout(emt_dataset, tmp_path):
    """Saved with tensor parallelism, resumed as a two-stage pipeline: the loss curve goes on."""
    args = ("train.max_steps=4", "train.save_every=2", *DIRECT)
    pretrain(2, tmp_path, emt_dataset, *args, "parallel.tensor=2")
    first = losses(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    out = pretrain(2, tmp_path, emt_dataset, *args, "parallel.pipeline=2")
    assert "resumed from" in out and "pipeline=2" in out
    again = losses(tmp_path)[len(first) :]
    assert [s for s, _ in again] == [3, 4]
    for (step, x), (_, y) in zip(first[2:], again, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step
