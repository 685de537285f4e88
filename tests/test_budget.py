"""How long runs train: epochs and FLOP budgets set the schedule, compute is recorded and
continues across a resume, early stopping keeps the best checkpoint."""

import json
import math

import pytest
from test_training import tiny_config

from megagnn.evaluate import main as evaluate_main
from megagnn.training.budget import EarlyStopping, planned_steps
from megagnn.training.checkpoint import read_common, resolve
from megagnn.training.trainer import Trainer


def test_planned_steps_follow_epochs_or_the_flops_budget():
    cfg = tiny_config("unused", "unused", "train.epochs=2.5", "train.microbatches=2").train
    assert planned_steps(cfg, [10] * 7, dp_size=1) == math.ceil(2.5 * 7 / 2)
    cfg = tiny_config("unused", "unused", "train.flops_budget=1e6").train
    # 1e6 FLOPs at 100 FLOPs/atom: 1e4 atoms, batches of 50 atoms on 2 replicas -> 100 steps
    assert planned_steps(cfg, [40, 60], dp_size=2, per_atom=100.0) == 100
    assert planned_steps(tiny_config("unused", "unused").train, [1], 1) == 6  # max_steps


def test_epochs_set_the_schedule_and_compute_is_recorded(emt_dataset, tmp_path):
    trainer = Trainer(tiny_config(emt_dataset, tmp_path, "train.epochs=2", "train.save_every=100"))
    batches = len(trainer.sources[0].sampler.batches(0))
    assert trainer.max_steps == 2 * batches
    trainer.train()
    assert trainer.step == 2 * batches
    compute = json.loads((tmp_path / "compute.json").read_text())
    atoms = 2 * int(trainer.data.n_atoms[trainer.data.indices["train"]].sum())
    assert compute["atoms"] == atoms and compute["steps"] == trainer.step
    assert compute["flops_per_atom"] > 1e3 and compute["wall_s"] > 0
    assert compute["flops"] == pytest.approx(compute["flops_per_atom"] * atoms)
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["compute/flops"] == pytest.approx(compute["flops"])


def test_flops_budget_sets_the_schedule(emt_dataset, tmp_path):
    probe = Trainer(tiny_config(emt_dataset, tmp_path / "probe", "train.flops_budget=1e9"))
    per_atom = probe.compute.flops_per_atom
    budget = 12 * per_atom * float(probe.data.n_atoms[probe.data.indices["train"]].mean())
    trainer = Trainer(tiny_config(emt_dataset, tmp_path / "run", f"train.flops_budget={budget}"))
    assert trainer.compute.flops_per_atom == per_atom  # the same first batch, counted alike
    trainer.train()
    spent = json.loads((tmp_path / "run" / "compute.json").read_text())["flops"]
    one_step = per_atom * max(trainer._epoch_batch_atoms())
    assert budget - one_step <= spent <= budget + one_step


def test_early_stopping_keeps_the_best_checkpoint(emt_dataset, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])  # best at the 2nd validation, then worse
    cfg = tiny_config(
        emt_dataset, tmp_path, "train.max_steps=20", "train.eval_every=2", "train.patience=2"
    )
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer, "validate", lambda: {"loss": next(losses)})
    trainer.train()
    assert trainer.step == 8  # validations at 2, 4 (best), 6, 8: two without improvement
    assert (trainer.early.best_step, trainer.early.best_loss) == (4, 2.0)
    assert resolve(tmp_path, "best").name == "step-00000004"
    assert read_common(resolve(tmp_path))["step"] == 8  # latest
    assert evaluate_main(["--run", str(tmp_path), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["step"] == 4
    for _ in range(3):  # later saves do not prune the best checkpoint
        trainer.step += 1
        trainer.save()
    assert resolve(tmp_path, "best").is_dir()


def test_early_stopping_counts_validations_without_improvement():
    early = EarlyStopping(patience=2)
    assert early.update(1.0, 10) and not early.stop
    assert not early.update(1.0, 20) and not early.stop  # equal is no improvement
    assert not early.update(1.5, 30) and early.stop
    assert not EarlyStopping(patience=0, waited=100).stop
