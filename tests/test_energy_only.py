"""Energy-only data done right: fp64 energies up to the loss, runs that see no force labels
train on energies alone, per-structure metrics and predictions, given splits."""

import csv
import json
import shutil

import ase.io
import h5py
import numpy as np
import pytest
import torch
from test_training import tiny_config

from megagnn import keys as K
from megagnn.config import ConfigError, LossConfig, load_config
from megagnn.data.emt import generate
from megagnn.data.graph import collate, structure_to_graph, to_device
from megagnn.data.preprocess import preprocess
from megagnn.data.shards import DataError, ShardedDataset
from megagnn.evaluate import main as evaluate_main
from megagnn.models import Potential
from megagnn.training.loss import loss_terms
from megagnn.training.trainer import Trainer

OFFSET = -1000.0  # eV per atom: totals of ~-3e4 eV, where fp32's spacing is ~2 meV


@pytest.fixture(scope="module")
def energy_only(tmp_path_factory):
    """EMT cells with energies alone (shifted to QM9-like magnitudes) and ids of their own."""
    frames = list(generate(30, seed=3, md_fraction=0.0, progress=False))
    for i, atoms in enumerate(frames):
        energy = atoms.get_potential_energy() + OFFSET * len(atoms)
        atoms.calc = None
        atoms.info = {"energy": energy, "id": f"frame-{i}"}
    raw = tmp_path_factory.mktemp("raw") / "energies.extxyz"
    ase.io.write(raw, frames)
    out = raw.parent / "processed"
    preprocess([str(raw)], out, shard_size=20, cutoff=4.0, progress=False)
    return out


def _batch(dataset, indices, dtype=torch.float32):
    graphs = [structure_to_graph(dataset[i], 4.0) for i in indices]
    return to_device(collate(graphs), torch.device("cpu"), dtype)


def test_energies_stay_fp64_to_the_loss_in_an_fp32_model(energy_only):
    data = ShardedDataset(energy_only)
    batch = _batch(data, range(4))
    assert batch[K.POSITIONS].dtype == torch.float32 and batch[K.ENERGY].dtype == torch.float64
    cfg = load_config(None, ["model.hidden=8", "model.layers=1", "model.cutoff=4.0"]).model
    model = Potential(cfg).to(torch.float32)
    # references that fp32 cannot hold; the learned part is zero, so E is their exact sum
    references = {z: OFFSET - 0.123456789 * z for z in (13, 29, 47, 79, 28, 46, 78)}
    model.set_statistics(0, references, 1.0, 10.0)
    model = model.to(torch.float32)  # a second cast keeps them too
    assert model.atomic_energies.dtype == torch.float64
    for p in model.energy_head.parameters():
        torch.nn.init.zeros_(p)
    exact = np.array([sum(references[int(z)] for z in data[i]["atomic_numbers"]) for i in range(4)])
    pred = model(batch, compute_forces=False)
    assert pred[K.ENERGY].dtype == torch.float64
    np.testing.assert_allclose(pred[K.ENERGY].detach().numpy(), exact, rtol=0, atol=1e-9)
    batch[K.ENERGY] = torch.from_numpy(exact) + 1e-4  # 0.1 meV off: above fp32's spacing
    n = batch[K.N_ATOMS].double()
    terms = loss_terms(pred, batch, model.scale, LossConfig(energy="per_structure"))
    assert float(terms["energy"]) == pytest.approx(1e-8, rel=1e-3)
    terms = loss_terms(pred, batch, model.scale, LossConfig())
    assert float(terms["energy"]) == pytest.approx(float((1e-4 / n).pow(2).mean()), rel=1e-3)
    terms = loss_terms(pred, batch, model.scale, LossConfig(energy="per_structure", function="l1"))
    assert float(terms["energy"]) == pytest.approx(1e-4, rel=1e-3)


def test_energy_only_data_trains_on_energies_alone(energy_only, tmp_path, capsys):
    trainer = Trainer(tiny_config(energy_only, tmp_path / "run", "train.max_steps=2"))
    assert "holds no forces: training fits energies only" in capsys.readouterr().out
    assert not trainer.potential.labels_forces and not trainer.potential.labels_stress
    metrics = trainer.train()
    assert "loss/forces" not in metrics and np.isfinite(metrics["loss/total"])
    assert trainer.potential.cfg.forces == "conservative"  # what the saved model predicts
    # forces=none implies no stress (it needed model.stress=false too)
    assert load_config(None, ["model.forces=none"]).model.stress is False
    with pytest.raises(ConfigError, match="model.forces=direct trains a force head"):
        Trainer(
            tiny_config(
                energy_only, tmp_path / "direct", "model.forces=direct", "model.stress=false"
            )
        )


def test_split_file_is_used_as_given_by_ids_or_indices(energy_only, tmp_path):
    ids = {"train": [f"frame-{i}" for i in range(3, 25)], "val": ["frame-25", "frame-1"]}
    ids["test"] = ["frame-0", "frame-2", *[f"frame-{i}" for i in range(26, 30)]]
    np.savez(tmp_path / "split.npz", **{k: np.array(v) for k, v in ids.items()})
    trainer = Trainer(
        tiny_config(energy_only, tmp_path / "a", f"data.split_file={tmp_path / 'split.npz'}")
    )
    assert trainer.data.indices["val"].tolist() == [1, 25]
    assert trainer.data.indices["train"].tolist() == list(range(3, 25))
    recorded = dict(np.load(tmp_path / "a" / "splits.npz"))
    assert recorded["test"].tolist() == [0, 2, 26, 27, 28, 29]
    # the same split as indices; train_fraction still takes a nested part of its train split
    np.savez(tmp_path / "idx.npz", **recorded)
    half = Trainer(
        tiny_config(
            energy_only,
            tmp_path / "b",
            f"data.split_file={tmp_path / 'idx.npz'}",
            "data.train_fraction=0.5",
        )
    )
    assert half.data.indices["test"].tolist() == [0, 2, 26, 27, 28, 29]
    assert set(half.data.indices["train"]) < set(range(3, 25))
    for bad, message in [
        ({"train": ["frame-99"], "val": ["frame-1"], "test": ["frame-0"]}, "frame-99"),
        ({"train": [3, 4], "val": [4], "test": [0]}, "listed twice"),
        ({"train": [3, 40], "val": [1], "test": [0]}, "outside 0..29"),
        ({"train": [3], "val": [1]}, "needs arrays train, val, test"),
    ]:
        np.savez(tmp_path / "bad.npz", **{k: np.array(v) for k, v in bad.items()})
        with pytest.raises(DataError, match=message):
            Trainer(tiny_config(energy_only, tmp_path / "c", f"data.split_file={tmp_path}/bad.npz"))


def test_a_different_splits_npz_in_the_run_folder_is_refused_not_overwritten(energy_only, tmp_path):
    (tmp_path / "run").mkdir()
    np.savez(tmp_path / "run" / "splits.npz", train=np.arange(20), val=[20], test=[21])
    before = (tmp_path / "run" / "splits.npz").read_bytes()
    with pytest.raises(ConfigError, match="set data.split_file="):
        Trainer(tiny_config(energy_only, tmp_path / "run", "checkpoint.resume=false"))
    assert (tmp_path / "run" / "splits.npz").read_bytes() == before
    given = f"data.split_file={tmp_path / 'run' / 'splits.npz'}"
    Trainer(tiny_config(energy_only, tmp_path / "run", given))  # as the message says
    assert (tmp_path / "run" / "splits.npz").read_bytes() == before


def test_evaluate_gives_per_structure_errors_and_predictions(energy_only, tmp_path, capsys):
    Trainer(tiny_config(energy_only, tmp_path / "run", "train.max_steps=3")).train()
    metrics, table = tmp_path / "m.json", tmp_path / "pred.csv"
    args = ["--run", str(tmp_path / "run"), "--json", str(metrics), "--predictions", str(table)]
    assert evaluate_main([*args, "--no-progress"]) == 0
    assert "energy_mae" in capsys.readouterr().out
    metrics = json.loads(metrics.read_text())
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["structures"] > 0
    err = np.array([float(r["energy_pred_eV"]) - float(r["energy_ref_eV"]) for r in rows])
    atoms = np.array([int(r["atoms"]) for r in rows])
    assert metrics["energy_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
    assert metrics["energy_rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-9)
    assert metrics["energy_per_atom_mae"] == pytest.approx(np.abs(err / atoms).mean(), rel=1e-9)
    test = np.load(tmp_path / "run" / "splits.npz")["test"]
    assert sorted(int(r["record"]) for r in rows) == sorted(test.tolist())
    assert all(r["record_id"] == f"frame-{r['record']}" for r in rows)
    assert "forces_mae" not in metrics  # nothing to compare forces with


def test_older_shards_with_nan_labels_and_no_ids_still_load(energy_only, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(energy_only, old)
    for shard in json.loads((old / "dataset.json").read_text())["shards"]:
        with h5py.File(old / shard["file"], "a") as f:
            del f["record_id"]
            f["forces"] = np.full((len(f["positions"]), 3), np.nan)
            f["stress"] = np.full((len(f["energy"]), 3, 3), np.nan)
    data = ShardedDataset(old)
    assert data.record_ids().tolist() == [str(i) for i in range(30)]
    graph = structure_to_graph(data[3], 4.0)
    assert not graph[K.HAS_FORCES] and not graph[K.HAS_STRESS] and graph[K.HAS_ENERGY]
    fresh = ShardedDataset(energy_only)
    assert data[3]["energy"] == fresh[3]["energy"] and fresh[3]["forces"] is None
