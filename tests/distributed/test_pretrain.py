"""``torchrun -m megagnn.pretrain`` with tensor, pipeline and data parallelism, on CPU (gloo)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ase.build import bulk
from launch import torchrun
from tiny_run import TINY_RUN

from megagnn.data import atoms_to_graph, collate, to_device
from megagnn.inference import load_model
from megagnn.parallel import device_check

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

DT = torch.float64


SETTINGS = (*TINY_RUN, "optim.warmup_steps=2")


def pretrain(nproc, out, dataset, *overrides, script=("-m", "megagnn.pretrain")):
    """``script --set`` the run's settings under torchrun; its output."""
    data = (f"data.path={dataset}", f"train.out_dir={out}")
    return torchrun(nproc, *script, "--set", *data, *SETTINGS, *overrides)


def losses(out, key="loss/total"):
    """(step, loss) in the order logged (a resumed run first drops what came after its
    checkpoint, then logs those steps again); or another logged ``key``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


DIRECT = ("model.forces=direct", "model.stress=false")
# megatron-core's DistributedOptimizer takes fp32/bf16 weights: these runs are fp32, with
# gradient accumulation, several gradient buckets and clipping that acts
MEGATRON = (
    "train.precision=fp32",
    "train.microbatches=2",
    "optim.grad_clip=0.1",
    "parallel.bucket_size=1000",
)
# name: (processes, the layout, the run's other settings)
LAYOUTS = {
    "schnet-tp2": (2, ("parallel.tensor=2",), ("model.family=schnet",)),
    # with node-parallel regions (atoms split over the two ranks between blocks)
    "painn-tp2-nodes": (
        2,
        ("parallel.tensor=2", "parallel.node_parallel=true"),
        ("model.family=painn",),
    ),
    # two 1F1B microbatches per step, gradients accumulated over them
    "painn-tp2pp2": (
        4,
        ("parallel.tensor=2", "parallel.pipeline=2"),
        ("model.family=painn", "train.microbatches=2", *DIRECT),
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_training_matches_one_process(emt_dataset, tmp_path, layout):
    nproc, split, model = LAYOUTS[layout]
    single = tmp_path / "single"
    pretrain(1, single, emt_dataset, *model, "train.max_steps=4")
    par = tmp_path / "parallel"
    pretrain(nproc, par, emt_dataset, *model, *split, "train.max_steps=4")
    a, b = losses(single), losses(par)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step
    # the sharded checkpoint loads into one process, directly or consolidated into one
    # safetensors file: the same model as the one-process run
    batch = to_device(collate([atoms_to_graph(bulk("Cu", "fcc", a=3.6) * 2, 4.0)]), "cpu", DT)
    assert convert_main(["consolidate", str(par), str(tmp_path / "one"), "--no-progress"]) == 0
    expected = load_model(single)(batch)
    # (an inference package is compiled from that same load_model: tests/test_package.py)
    for model in (load_model(par), load_model(tmp_path / "one")):
        for key, value in model(batch).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-7, atol=1e-10)


def test_resume_reproduces_the_data_parallel_run(emt_dataset, tmp_path):
    args = ("train.max_steps=4", "checkpoint.every=2")
    pretrain(2, tmp_path, emt_dataset, *args)
    first = losses(tmp_path)
    # as if the job had died after the step-2 checkpoint
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    out = pretrain(2, tmp_path, emt_dataset, *args)
    assert "resumed from" in out
    assert losses(tmp_path) == first  # steps 3 and 4 again, bit for bit


def test_resume_under_another_layout(emt_dataset, tmp_path):
    """Saved with tensor parallelism, resumed as a two-stage pipeline: the loss curve goes on."""
    args = ("train.max_steps=4", "checkpoint.every=2", *DIRECT)
    pretrain(2, tmp_path, emt_dataset, *args, "parallel.tensor=2")
    first = losses(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    out = pretrain(2, tmp_path, emt_dataset, *args, "parallel.pipeline=2")
    assert "resumed from" in out and "pipeline=2" in out
    again = losses(tmp_path)
    assert again[:2] == first[:2]
    again = again[2:]
    assert [s for s, _ in again] == [3, 4]
    for (step, x), (_, y) in zip(first[2:], again, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step


def _all_tensors(path):
    """Every global tensor of a checkpoint (weights and optimizer moments), by key."""
    from megagnn.checkpoint import sharded as checkpoint

    path = checkpoint.resolve(path)
    meta = checkpoint.tensors_metadata(path)
    return {k: checkpoint.read_tensor(path, k, m) for k, m in meta.items()}


def test_reshard_round_trips_and_resumes(emt_dataset, tmp_path):
    """TP=2 -> PP=2 -> TP=2 gives back every tensor bit for bit; training resumed from the
    PP=2 copy continues the TP=2 run's loss curve."""
    args = ("train.max_steps=4", "checkpoint.every=2", *DIRECT)
    run = tmp_path / "run"
    pretrain(2, run, emt_dataset, *args, "parallel.tensor=2")
    first = losses(run)
    step2 = run / "checkpoints" / "step-00000002"
    pp2, back = tmp_path / "pp2", tmp_path / "back"
    assert convert_main(["reshard", str(step2), str(pp2), "--pipeline", "2"]) == 0
    assert convert_main(["reshard", str(pp2), str(back), "--tensor", "2"]) == 0
    original, returned = _all_tensors(step2), _all_tensors(back)
    assert any(".exp_avg_sq" in k or "optimizer" in k for k in original), sorted(original)
    assert original.keys() == returned.keys()
    for key, value in original.items():
        assert torch.equal(value, returned[key]), key
    out = pretrain(2, pp2, emt_dataset, *args, "parallel.pipeline=2")
    assert "resumed from" in out
    again = losses(pp2)
    assert [s for s, _ in again] == [3, 4]
    for (step, x), (_, y) in zip(first[2:], again, strict=True):
        assert y == pytest.approx(x, rel=1e-9), step


def test_collectives_get_tensors_on_the_compute_device(emt_dataset, tmp_path, monkeypatch):
    """NCCL refuses host tensors, gloo takes them: with the device check on, every collective
    refuses a tensor a GPU run would hold on the host. Covers data-parallel training (sharded
    optimizer) with validation, the best and periodic checkpoints and the per-step SIGTERM
    agreement, on both data-parallel paths; reshard to tensor parallelism and resume there
    (load, TP collectives in the force double backward); a two-stage pipeline
    (point-to-point, broadcasts)."""
    monkeypatch.setenv(device_check.ENV, "1")
    args = ("train.max_steps=4", "checkpoint.every=2", "validate.every=2")
    run, tp2 = tmp_path / "run", tmp_path / "tp2"
    pretrain(2, run, emt_dataset, *args, "validate.patience=5")
    megatron = (*MEGATRON, "parallel.data_parallel=megatron")
    pretrain(2, tmp_path / "megatron", emt_dataset, *args, *megatron)
    step2 = str(run / "checkpoints" / "step-00000002")
    assert convert_main(["reshard", step2, str(tp2), "--tensor", "2"]) == 0
    assert "resumed from" in pretrain(2, tp2, emt_dataset, *args, "parallel.tensor=2")
    pipeline = ("parallel.pipeline=2", "train.microbatches=2", "validate.every=1")
    pretrain(2, tmp_path / "pp2", emt_dataset, *DIRECT, *pipeline, "train.max_steps=2")


def test_validation_is_split_over_data_parallel_ranks(emt_dataset, tmp_path, capsys):
    """Each data-parallel rank validates its share of the split; the summed errors equal
    one process evaluating the whole split with the same weights."""
    from megagnn.evaluate import main as evaluate_main

    pretrain(2, tmp_path, emt_dataset, "train.max_steps=2", "validate.every=2")
    logged = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in logged if "val/forces_mae" in r)
    out = tmp_path / "val.json"
    assert evaluate_main(["--run", str(tmp_path), "--split", "val", "--json", str(out)]) == 0
    whole = json.loads(out.read_text())
    for key in ("energy_per_atom_mae", "forces_mae", "stress_mae"):
        assert val[f"val/{key}"] == pytest.approx(whole[key], rel=1e-6), key  # evaluate: fp32


@pytest.mark.parametrize(
    "nproc,layout",
    [(1, ()), (2, ()), (4, ("parallel.tensor=2",))],
    ids=["one-process", "dp2", "tp2dp2"],
)
def test_megatron_data_parallel_matches_the_flat_path(emt_dataset, tmp_path, nproc, layout):
    """megatron-core DDP (buckets reduced during the backward of the conservative-force
    loss, a second derivative) + DistributedOptimizer train as the flat all-reduce + ZeRO-1
    path does; its checkpoint resumes under itself and under the flat path."""
    args = (*MEGATRON, *layout, "train.max_steps=4", "checkpoint.every=2")
    flat, megatron = tmp_path / "flat", tmp_path / "megatron"
    pretrain(nproc, flat, emt_dataset, *args, "parallel.data_parallel=flat")
    pretrain(nproc, megatron, emt_dataset, *args, "parallel.data_parallel=megatron")
    a, b = losses(flat), losses(megatron)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-6), step
    # the global norm clipping used (AdamW would hide a wrong one): every rank's share of
    # the gradient, tensor-parallel slices summed, replicated weights counted once
    norms = [losses(run, "grad_norm") for run in (flat, megatron)]
    for (step, x), (_, y) in zip(*norms, strict=True):
        assert y == pytest.approx(x, rel=1e-6), step
    if nproc != 2:
        return
    for path in ("megatron", "flat"):  # resumed from the megatron run's step 2
        again = tmp_path / f"again-{path}"
        shutil.copytree(megatron, again)
        (again / "checkpoints" / "latest").write_text("step-00000002")
        out = pretrain(nproc, again, emt_dataset, *args, f"parallel.data_parallel={path}")
        assert "resumed from" in out
        for (step, x), (_, y) in zip(b, losses(again), strict=True):
            assert y == pytest.approx(x, rel=1e-6), (path, step)


@pytest.mark.parametrize("path", ["flat", "megatron"])
def test_a_non_finite_loss_on_one_replica_skips_the_step_everywhere(emt_dataset, tmp_path, path):
    worker = (str(Path(__file__).parent / "nan_worker.py"),)
    args = ("train.precision=fp32", f"parallel.data_parallel={path}")
    assert "NAN GUARD PASSED" in pretrain(2, tmp_path, emt_dataset, *args, script=worker)
