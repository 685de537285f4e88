import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch

from megagnn import keys as K
from megagnn.checkpoint.sharded import CheckpointError, read_common
from megagnn.config import ConfigError, load_config
from megagnn.data.shards import ShardedDataset
from megagnn.evaluate import main as evaluate_main
from megagnn.pretrain import main as pretrain_main
from megagnn.training.trainer import Trainer


def tiny_config(dataset, out_dir, *extra):
    return load_config(
        None,
        [
            f"data.path={dataset}",
            f"train.out_dir={out_dir}",
            "data.max_atoms=96",
            "data.split=[0.7, 0.15, 0.15]",
            "model.hidden=16",
            "model.layers=2",
            "model.num_rbf=8",
            "model.cutoff=4.0",
            "train.max_steps=6",
            "optim.warmup_steps=2",
            "checkpoint.every=3",
            "validate.every=0",
            "train.progress=false",
            "train.log_every=1",
            *extra,
        ],
    )


def run_losses(trainer, crash_after=None):
    """Train, recording each step's loss; optionally die (like a killed job) mid-run."""
    losses, step = [], trainer.train_step

    def recording(batch):
        if crash_after is not None and len(losses) == crash_after:
            raise KeyboardInterrupt("simulated crash")
        out = step(batch)
        losses.append(out["loss/total"])
        return out

    trainer.train_step = recording
    trainer.train()
    return losses


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_resume_reproduces_uninterrupted_run(emt_dataset, tmp_path, family):
    ref = Trainer(tiny_config(emt_dataset, tmp_path / "a", f"model.family={family}"))
    ref_losses = run_losses(ref)

    crashed = Trainer(tiny_config(emt_dataset, tmp_path / "b", f"model.family={family}"))
    with pytest.raises(KeyboardInterrupt):
        run_losses(crashed, crash_after=4)  # checkpoint at step 3, dies during step 5
    resumed = Trainer(tiny_config(emt_dataset, tmp_path / "b", f"model.family={family}"))
    assert resumed.step == 3
    tail = run_losses(resumed)
    assert tail == ref_losses[3:]  # bit-for-bit
    # the compute count continues where the checkpoint left it
    assert resumed.compute.atoms == ref.compute.atoms and resumed.compute.steps == 6
    assert resumed.compute.flops_per_atom == ref.compute.flops_per_atom
    # the losses above are exact; the weights after the last update differ by up to ~3e-9
    # when the machine is loaded (thread-timing-dependent CPU reductions), hence atol 1e-7:
    # a resume that lost optimizer or schedule state is off by the order of the lr (1e-3)
    for (name, a), b in zip(
        ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_training_reduces_force_error(emt_dataset, tmp_path):
    cfg = tiny_config(
        emt_dataset, tmp_path, "train.max_steps=60", "optim.lr=5e-3", "checkpoint.every=1000"
    )
    trainer = Trainer(cfg)
    before = trainer.validate()
    trainer.train()
    after = trainer.validate()
    assert after["forces_mae"] < 0.8 * before["forces_mae"]
    assert after["forces_mae"] < after["baseline_zero_forces_mae"]


def test_bf16_step_is_finite(emt_dataset, tmp_path):
    trainer = Trainer(
        tiny_config(emt_dataset, tmp_path, "train.precision=bf16", "train.max_steps=2")
    )
    losses = run_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_nan_guard_skips_bad_steps_then_aborts(emt_dataset, tmp_path):
    trainer = Trainer(
        tiny_config(emt_dataset, tmp_path, "train.max_bad_steps=3", "train.max_steps=10")
    )
    good, calls = trainer.next_batches, [0]

    def poisoned():
        batches = good()
        if calls[0] >= 1:
            for batch in batches:
                batch[K.ENERGY][:] = float("nan")
        calls[0] += 1
        return batches

    trainer.next_batches = poisoned
    weights = None
    original_step = trainer.train_step

    def spy(batch):
        nonlocal weights
        out = original_step(batch)
        if out is not None:
            weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return out

    trainer.train_step = spy
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(FloatingPointError):
        trainer.train()
    assert trainer.step == 4  # 1 good step, then 3 bad ones
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} changed by a skipped step"


def test_cli_train_then_evaluate(emt_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        f"data.path={emt_dataset}",
        f"train.out_dir={out}",
        "model.hidden=8",
        "model.layers=1",
        "model.cutoff=4.0",
        "train.max_steps=2",
        "train.progress=false",
        "data.split=[0.6, 0.2, 0.2]",
    ]
    assert pretrain_main(["--set", *args]) == 0
    assert (out / "checkpoints" / "latest").is_file()
    assert list((out / "tensorboard").iterdir())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/forces_mae" in r for r in records) and any("loss/total" in r for r in records)
    assert evaluate_main(["--run", str(out), "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "forces_mae" in text and "zero-force" in text
    assert pretrain_main(["--set", "model.hidden=oops"]) == 2
    assert pretrain_main(["--set", "data.path=/no/such/dir"]) == 2


@pytest.mark.parametrize(
    "change, field",
    [
        ("model.hidden=8", "model.hidden"),
        ("data.split_seed=1", "data.split_seed"),
        ("data.split=[0.8, 0.1, 0.1]", "data.split"),
        ("data.train_fraction=0.5", "data.train_fraction"),
    ],
)
def test_resume_refuses_another_model_or_other_data(emt_dataset, tmp_path, change, field):
    Trainer(tiny_config(emt_dataset, tmp_path, "train.max_steps=1")).train()
    with pytest.raises(ConfigError, match=rf"differs from the checkpoint's in {field}:"):
        Trainer(tiny_config(emt_dataset, tmp_path, change))
    # the loader's worker count changes nothing the model sees
    Trainer(tiny_config(emt_dataset, tmp_path, "data.num_workers=1"))


def test_resume_refuses_a_dataset_whose_split_changed(emt_dataset, tmp_path):
    Trainer(tiny_config(emt_dataset, tmp_path, "train.max_steps=1")).train()
    splits = dict(np.load(tmp_path / "splits.npz"))
    splits["test"] = splits["test"][1:]
    np.savez(tmp_path / "splits.npz", **splits)
    with pytest.raises(ConfigError, match="test split .* differs from the one recorded"):
        Trainer(tiny_config(emt_dataset, tmp_path))


def test_run_records_its_split_and_training_statistics(emt_dataset, tmp_path, capsys):
    trainer = Trainer(tiny_config(emt_dataset, tmp_path / "run", "train.max_steps=1"))
    trainer.train()
    data = trainer.sources[0].data
    with np.load(tmp_path / "run" / "splits.npz") as f:
        assert set(f) == {"train", "val", "test"}
        for name in f:
            np.testing.assert_array_equal(f[name], data.indices[name])
    stats = json.loads((tmp_path / "run" / "statistics.json").read_text())
    assert stats == trainer.statistics == read_common(tmp_path / "run")["statistics"]
    assert stats["datasets"][0]["n_structures"] == len(data.indices["train"])
    model = trainer.potential
    assert float(model.scale[0]) == pytest.approx(stats["datasets"][0]["force_rms"])
    assert float(model.avg_num_neighbors) == pytest.approx(stats["avg_num_neighbors"])
    # evaluation reads the recorded split, not a recomputed one
    splits = dict(np.load(tmp_path / "run" / "splits.npz"))
    splits["test"] = np.array([0, 1, 2])
    np.savez(tmp_path / "run" / "splits.npz", **splits)
    capsys.readouterr()
    assert evaluate_main(["--run", str(tmp_path / "run"), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["structures"] == 3


def test_held_out_labels_never_inform_the_model(emt_dataset, tmp_path):
    """Statistics come from the training split: changing every validation and test label
    leaves the model's reference energies, scale and normaliser bit for bit the same."""
    clean = Trainer(tiny_config(emt_dataset, tmp_path / "a"))
    changed = tmp_path / "changed"
    shutil.copytree(emt_dataset, changed)
    held_out = np.concatenate([clean.data.indices["val"], clean.data.indices["test"]])
    data = ShardedDataset(changed)
    for i in held_out.tolist():
        k, local = data._locate(i)
        with h5py.File(changed / data.manifest["shards"][k]["file"], "r+") as f:
            f["energy"][local] += 50.0
            a, b = f["atom_offsets"][local : local + 2]
            f["forces"][a:b] *= 3.0
    other = Trainer(tiny_config(changed, tmp_path / "b"))
    assert len(held_out) and np.array_equal(
        other.data.indices["train"], clean.data.indices["train"]
    )
    for name, value in clean.potential.named_buffers():
        assert torch.equal(value, dict(other.potential.named_buffers())[name]), name
    # the check can fail: the same change to one training record moves the statistics
    other.data.dataset.close()
    k, local = data._locate(int(clean.data.indices["train"][0]))
    with h5py.File(changed / data.manifest["shards"][k]["file"], "r+") as f:
        f["energy"][local] += 50.0
    moved = Trainer(tiny_config(changed, tmp_path / "c"))
    assert not torch.equal(moved.potential.atomic_energies, clean.potential.atomic_energies)


def test_missing_or_broken_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_common(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        read_common(tmp_path)
    step = tmp_path / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000001")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        read_common(tmp_path)
    (step / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="step-00000001/metadata.json: corrupt"):
        read_common(tmp_path)
    (step / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (step / "common.pt").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CheckpointError, match="step-00000001/common.pt: corrupt"):
        read_common(tmp_path)


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_activation_recompute_gives_the_same_gradients(family):
    """Recomputed blocks must reproduce the force-loss gradients (second derivatives pass
    through the checkpointed blocks) and keep fewer tensors alive."""
    from ase.build import bulk

    from megagnn.config import LossConfig, ModelConfig
    from megagnn.data import atoms_to_graph, collate, to_device
    from megagnn.models import build_model
    from megagnn.training.loss import loss_terms

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.1, seed=0)
    atoms.info["energy"] = -1.0
    atoms.arrays["forces"] = 0.1 * torch.randn(len(atoms), 3, dtype=torch.float64).numpy()
    graph = atoms_to_graph(atoms, 4.0)
    graph[K.ENERGY] = torch.tensor([-1.0])
    graph[K.FORCES] = torch.from_numpy(atoms.arrays["forces"])
    graph[K.HAS_ENERGY] = graph[K.HAS_FORCES] = torch.ones(1, dtype=torch.bool)
    batch = to_device(collate([graph]), "cpu", torch.float64)
    cfg = ModelConfig(family=family, hidden=16, layers=3, num_rbf=8, cutoff=4.0, stress=False)

    grads, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg).double().train()
        model.recompute_activations = recompute
        kept = []

        def pack(t, kept=kept):
            kept.append(1)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_terms(model(batch), batch, model.scale, LossConfig())["total"]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(len(kept))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-14, msg=name)
    assert saved[1] < saved[0]


def test_consolidated_checkpoint_predicts_like_the_run(emt_dataset, tmp_path):
    import sys
    from pathlib import Path

    from safetensors import safe_open

    from megagnn.data import collate, to_device
    from megagnn.data.sampler import GraphDataset
    from megagnn.inference.calculator import load_model

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from convert_checkpoint import main as convert

    Trainer(tiny_config(emt_dataset, tmp_path / "run", "train.max_steps=2")).train()
    assert convert(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert convert(["consolidate", str(tmp_path / "run"), str(tmp_path / "one")]) == 0
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        assert "backbone.blocks.1.update.U.weight" in f.keys()
    graphs = GraphDataset(ShardedDataset(emt_dataset), 4.0)
    batch = to_device(collate([graphs[0], graphs[1]]), "cpu", torch.float64)
    a = load_model(tmp_path / "run")(batch)
    b = load_model(tmp_path / "one")(batch)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)


def test_periodic_validation_can_read_a_fixed_subset(emt_dataset, tmp_path):
    full = Trainer(tiny_config(emt_dataset, tmp_path / "a"))
    part = Trainer(tiny_config(emt_dataset, tmp_path / "b", "validate.structures=3"))
    val = full.sources[0].data.indices["val"]
    assert len(val) > 3
    picked = np.concatenate(part.sources[0].data.sampler("val", False, limit=3).batches(0))
    assert len(picked) == 3 and set(picked) <= set(val)
    again = np.concatenate(part.sources[0].data.sampler("val", False, limit=3).batches(0))
    np.testing.assert_array_equal(picked, again)  # the same subset at every validation
    sub, whole = part.validate(), full.validate()
    assert sub["energy_per_atom_mae"] != whole["energy_per_atom_mae"]
    with pytest.raises(ConfigError, match="validate.structures"):
        tiny_config(emt_dataset, tmp_path, "validate.structures=-1")


def test_deterministic_runs_train(emt_dataset, tmp_path):
    from megagnn import ops

    trainer = Trainer(tiny_config(emt_dataset, tmp_path, "train.deterministic=true"))
    try:
        assert torch.are_deterministic_algorithms_enabled() and ops._deterministic
        assert math.isfinite(trainer.train()["loss/total"])
    finally:
        torch.use_deterministic_algorithms(False)
        ops.set_deterministic(False)


def test_checkpoints_older_than_the_element_record_still_load(emt_dataset, tmp_path):
    """A checkpoint written before the model recorded its elements loads, the elements
    rebuilt from the reference energies (the elements the training split held)."""
    from megagnn.checkpoint import sharded as checkpoint
    from megagnn.inference import load_model

    trainer = Trainer(tiny_config(emt_dataset, tmp_path, "train.max_steps=1"))
    trainer.train()
    known = trainer.potential.elements()
    saved = tmp_path / "old"
    real = checkpoint.global_named_tensors

    def old_tensors(model):  # what a checkpoint of the older models held
        return [t for t in real(model) if not t[0].endswith("trained_elements")]

    checkpoint.global_named_tensors = old_tensors
    try:
        common = {"config": read_common(tmp_path)["config"], "step": 1}
        checkpoint.save(saved, 1, trainer.model, None, common, trainer.par)
    finally:
        checkpoint.global_named_tensors = real
    assert known and load_model(saved / "step-00000001").elements() == known
