"""``torchrun -m megagnn.pretrain`` with tensor and data parallelism, on CPU with gloo."""

import json

import pytest
from launch import torchrun


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


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_tensor_parallel_training_matches_one_process(emt_dataset, tmp_path, family):
    single = tmp_path / "single"
    pretrain(1, single, emt_dataset, f"model.family={family}", "train.max_steps=4")
    tp = tmp_path / "tp"
    pretrain(2, tp, emt_dataset, f"model.family={family}", "train.max_steps=4", "parallel.tensor=2")
    a, b = losses(single), losses(tp)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step
    assert sorted(p.name for p in (tp / "checkpoints").glob("*.pt"))[-2:] == [
        "step-00000004-tp0of2.pt",
        "step-00000004-tp1of2.pt",
    ]


@pytest.mark.parametrize("tensor", [1, 2], ids=["dp2", "tp2"])
def test_resume_reproduces_the_run(emt_dataset, tmp_path, tensor):
    args = ("train.max_steps=4", "train.save_every=2", f"parallel.tensor={tensor}")
    pretrain(2, tmp_path, emt_dataset, *args)
    first = losses(tmp_path)
    # as if the job had died after the step-2 checkpoint
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    out = pretrain(2, tmp_path, emt_dataset, *args)
    assert "resumed from" in out
    again = losses(tmp_path)[len(first) :]
    assert again == first[2:]  # steps 3 and 4, bit for bit
