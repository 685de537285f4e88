"""Fine-tuning (finetune.init_from, init_heads, freeze, lr_multipliers) and the weight average
(optim.ema_decay): what loads, what trains, what is served, and exact resume."""

import pytest
import torch
from test_training import run_losses, tiny_config

from megagnn.checkpoint.consolidated import load_weights
from megagnn.config import ConfigError
from megagnn.convert import consolidate
from megagnn.inference import load_model
from megagnn.training.trainer import Trainer


@pytest.fixture(scope="module")
def pretrained(emt_dataset, tmp_path_factory):
    """A tiny pretrained run (6 steps) and its consolidated folder."""
    out = tmp_path_factory.mktemp("pretrained")
    trainer = Trainer(tiny_config(emt_dataset, out / "run"))
    trainer.train()
    consolidate(out / "run", out / "consolidated", progress=False)
    return out / "run", out / "consolidated", trainer


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source", ["run", "consolidated"])
def test_init_from_loads_the_trunk_and_maps_heads(emt_dataset, tmp_path, pretrained, source):
    run, folder, ref = pretrained
    init = run if source == "run" else folder
    overrides = [
        f"finetune.init_from={init}",
        "model.heads=[alloys, extra]",
        "finetune.init_heads=[alloys=default]",
        "data.datasets=[{path: " + str(emt_dataset) + ", head: alloys}]",
    ]
    trainer = Trainer(tiny_config(emt_dataset, tmp_path, *overrides))
    old, new = _weights(ref.potential), _weights(trainer.potential)
    for name, value in old.items():
        if name.startswith("backbone."):
            torch.testing.assert_close(new[name], value, rtol=0, atol=0, msg=name)
        if name.startswith("energy_head.mlps.0."):  # alloys <- default
            torch.testing.assert_close(new[name], value, rtol=0, atol=0, msg=name)
            # extra starts fresh
            assert not torch.equal(new[name.replace("mlps.0", "mlps.1")], value), name
    # the pretrained function: its neighbour normaliser and head scale are kept
    assert new["avg_num_neighbors"] == old["avg_num_neighbors"]
    assert new["scale"][0] == old["scale"][0]
    assert trainer.statistics["init_from"]["heads"] == {"alloys": "default", "extra": None}
    assert trainer.step == 0 and trainer.scheduler.last_epoch == 0  # a new schedule


def test_init_from_refuses_another_trunk_and_unknown_heads(emt_dataset, tmp_path, pretrained):
    run = pretrained[0]
    with pytest.raises(ConfigError, match=r"model\.hidden=16 \(this run: 24\)"):
        Trainer(
            tiny_config(emt_dataset, tmp_path / "a", f"finetune.init_from={run}", "model.hidden=24")
        )
    with pytest.raises(ConfigError, match="pretrained model has heads"):
        Trainer(
            tiny_config(
                emt_dataset,
                tmp_path / "b",
                f"finetune.init_from={run}",
                "finetune.init_heads=[default=nope]",
            )
        )


def test_frozen_parameters_and_lr_multipliers(emt_dataset, tmp_path, pretrained):
    run = pretrained[0]
    overrides = [
        f"finetune.init_from={run}",
        "finetune.freeze=[backbone.embedding.*]",
        "optim.lr_multipliers=[backbone.blocks.*=0.0, energy_head.*=2]",
    ]
    trainer = Trainer(tiny_config(emt_dataset, tmp_path, *overrides))
    before = _weights(trainer.potential)
    trainer.train()
    after = _weights(trainer.potential)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("backbone.embedding.") for k in changed)
    assert not any(k.startswith("backbone.blocks.") for k in changed)  # lr x 0
    assert any(k.startswith("energy_head.") for k in changed)
    lrs = sorted(
        {g["lr"] / trainer.scheduler.get_last_lr()[0] for g in trainer.optimizer.param_groups}
    )
    assert lrs == pytest.approx([0.0, 1.0, 2.0])
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer(tiny_config(emt_dataset, tmp_path / "x", "finetune.freeze=[backbone.nothing*]"))


def test_weight_average_resumes_exactly_and_is_what_is_served(emt_dataset, tmp_path):
    ema = "optim.ema_decay=0.9"
    ref = Trainer(tiny_config(emt_dataset, tmp_path / "a", ema))
    ref_losses = run_losses(ref)
    crashed = Trainer(tiny_config(emt_dataset, tmp_path / "b", ema))
    with pytest.raises(KeyboardInterrupt):
        run_losses(crashed, crash_after=4)
    resumed = Trainer(tiny_config(emt_dataset, tmp_path / "b", ema))
    assert resumed.average.updates == 3
    assert run_losses(resumed) == ref_losses[3:]
    for p, q in zip(ref.average.params, resumed.average.params, strict=True):
        torch.testing.assert_close(
            resumed.average.shadow[q], ref.average.shadow[p], rtol=1e-6, atol=1e-7
        )

    # the average is not the weights, and it is what load_model and consolidate give
    names = [n for n, _ in ref.potential.named_parameters()]
    shadow = dict(zip(names, (ref.average.shadow[p] for p in ref.average.params), strict=True))
    raw = dict(ref.potential.named_parameters())
    assert any(not torch.equal(shadow[n], raw[n]) for n in names)
    served = dict(load_model(tmp_path / "a", dtype=torch.float32).named_parameters())
    consolidate(tmp_path / "a", tmp_path / "c", progress=False)
    weights = load_weights(tmp_path / "c")
    for n in names:
        torch.testing.assert_close(served[n], shadow[n], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(weights[n], shadow[n], rtol=0, atol=0, msg=n)
    consolidate(tmp_path / "a", tmp_path / "t", progress=False, average=False)
    trained = load_weights(tmp_path / "t")
    assert all(torch.equal(trained[n], raw[n].detach()) for n in names)
