"""How long runs train: epochs and FLOP budgets set the schedule, compute is recorded and
continues across a resume, early stopping keeps the best checkpoint."""

import json
import math

import pytest
from test_training import tiny_config

from megagnn.checkpoint.sharded import read_common, resolve
from megagnn.evaluate import main as evaluate_main
from megagnn.training.budget import EarlyStopping, planned_steps
from megagnn.training.trainer import Trainer


def test_planned_steps_follow_epochs_or_the_flops_budget():
    cfg = tiny_config("unused", "unused", "train.epochs=2.5", "train.microbatches=2").train
    assert planned_steps(cfg, [10] * 7, dp_size=1) == math.ceil(2.5 * 7 / 2)
    cfg = tiny_config("unused", "unused", "train.flops_budget=1e6").train
    # 1e6 FLOPs at 100 FLOPs/atom: 1e4 atoms, batches of 50 atoms on 2 replicas -> 100 steps
    assert planned_steps(cfg, [40, 60], dp_size=2, per_atom=100.0) == 100
    assert planned_steps(tiny_config("unused", "unused").train, [1], 1) == 6  # max_steps


def test_epochs_set_the_schedule_and_compute_is_recorded(emt_dataset, tmp_path):
    trainer = Trainer(tiny_config(emt_dataset, tmp_path, "train.epochs=2", "checkpoint.every=100"))
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
        emt_dataset, tmp_path, "train.max_steps=20", "validate.every=2", "validate.patience=2"
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


def test_mup_equals_the_standard_parametrisation_at_the_base_width(emt_dataset, tmp_path):
    sp = Trainer(tiny_config(emt_dataset, tmp_path / "sp", "train.precision=fp64"))
    mup = Trainer(
        tiny_config(
            emt_dataset,
            tmp_path / "mup",
            "train.precision=fp64",
            "model.parametrization=mup",
            "model.mup_base_width=16",  # = model.hidden
        )
    )
    losses = [[t.train_step(t.next_batches())["loss/total"] for _ in range(3)] for t in (sp, mup)]
    assert losses[0] == losses[1]


def test_mup_scales_hidden_and_output_weights_with_the_width(emt_dataset, tmp_path):
    import torch

    sets = ["model.hidden=32", "optim.lr=1e-3"]
    sp = Trainer(tiny_config(emt_dataset, tmp_path / "sp", *sets))
    mup = Trainer(
        tiny_config(
            emt_dataset,
            tmp_path / "mup",
            *sets,
            "model.parametrization=mup",
            "model.mup_base_width=8",
        )
    )
    groups = mup.optimizer.param_groups  # initial_lr: before the warmup factor
    lr = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    assert groups[0]["initial_lr"] == 1e-3  # the base group comes first
    weights = dict(mup.potential.named_parameters())
    reference = dict(sp.potential.named_parameters())
    hidden = "backbone.blocks.0.update.U.weight"  # [H, H]
    output = "energy_head.mlps.0.2.weight"  # [1, H/2]
    embedding = "backbone.embedding.weight"  # [max_z + 1, H]: input
    assert lr[id(weights[hidden])] == pytest.approx(1e-3 / 4)  # width multiplier 32 / 8
    assert lr[id(weights[output])] == pytest.approx(1e-3 / 4)
    assert lr[id(weights[embedding])] == 1e-3
    assert lr[id(weights["energy_head.mlps.0.2.bias"])] == 1e-3
    torch.testing.assert_close(weights[output], reference[output] / 2)  # 1/sqrt(4)
    assert torch.equal(weights[hidden], reference[hidden])
    assert torch.equal(weights[embedding], reference[embedding])


def test_time_budget_parses_and_excludes_other_lengths():
    from megagnn.config import ConfigError, parse_duration

    assert parse_duration("1:30:00") == 5400 and parse_duration("90:00") == 5400
    assert parse_duration(7.5) == 7.5
    for bad in ("1:2:3:4", "soon", "-5"):
        with pytest.raises(ConfigError, match="HH:MM:SS"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="keep one"):
        tiny_config("unused", "unused", "train.time_budget=60", "train.epochs=1")


def test_schedule_follows_the_clock_under_a_time_budget():
    import torch

    from megagnn.training.schedule import warmup_cosine

    cfg = tiny_config("unused", "unused", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1").optim
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    spent = [0.0]
    sched = warmup_cosine(opt, cfg, 10, progress=lambda: spent[0])
    for _ in range(5):  # past warmup, no time spent: the peak
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1.0)
    spent[0] = 0.5
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1 + 0.9 * 0.5)
    spent[0] = 1.0
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_time_budget_stops_with_a_checkpoint_before_it_ends(emt_dataset, tmp_path, capsys):
    budget = 12.0
    overrides = [f"train.time_budget={budget}", "train.max_steps=1", "checkpoint.every=1000"]
    trainer = Trainer(tiny_config(emt_dataset, tmp_path, *overrides, "validate.every=5"))
    trainer.train()
    assert trainer.step > 1  # max_steps does not bound a time-budget run
    assert trainer.compute.wall_s < budget
    assert "time budget: stopped at step" in capsys.readouterr().out
    assert read_common(resolve(tmp_path))["step"] == trainer.step  # saved at the stop
    # the learning rate followed the clock down to about its end
    lr = trainer.scheduler.get_last_lr()[0] / trainer.cfg.optim.lr
    assert lr < 0.25
    # resuming counts the time already spent: nothing or almost nothing is left
    again = Trainer(tiny_config(emt_dataset, tmp_path, *overrides, "validate.every=5"))
    assert again.compute.wall_s == pytest.approx(trainer.compute.wall_s)
    again.train()
    assert trainer.step <= again.step and again.compute.wall_s < budget
