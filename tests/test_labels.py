"""Label keys and partly labelled records: MACE-style REF_* keys, forces-only, energy-only
and stress-less structures are kept, and each loss term sees only the records that have it."""

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from megagnn import keys as K
from megagnn.config import LossConfig
from megagnn.data import DataError, ShardedDataset, read_manifest
from megagnn.data.graph import collate, structure_to_graph
from megagnn.data.preprocess import main as preprocess_main
from megagnn.data.preprocess import preprocess
from megagnn.data.statistics import training_statistics
from megagnn.training.loss import ErrorMeter, loss_terms


def _emt_cell(seed: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=seed)
    atoms.numbers[seed % len(atoms)] = 79
    atoms.calc = EMT()
    return atoms, atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_mace_style_label_keys(tmp_path):
    frames, expected = [], []
    for seed in range(3):
        atoms, e, f, s = _emt_cell(seed)
        atoms.calc = None
        atoms.info["REF_energy"], atoms.arrays["REF_forces"], atoms.info["REF_stress"] = e, f, s
        frames.append(atoms)
        expected.append((e, f))
    path = tmp_path / "mace.extxyz"
    ase.io.write(path, frames)
    with pytest.raises(DataError, match="no labels.*--energy-key"):
        preprocess([str(path)], tmp_path / "plain", progress=False)
    out = tmp_path / "ref"
    args = [str(path), "-o", str(out), "--no-progress", "--energy-key", "REF_energy"]
    args += ["--forces-key", "REF_forces", "--stress-key", "REF_stress"]
    assert preprocess_main(args) == 0
    data = ShardedDataset(out)
    for i, (e, f) in enumerate(expected):
        assert data[i]["energy"] == pytest.approx(e)
        np.testing.assert_allclose(data[i]["forces"], f, atol=1e-6)  # text rounding
    assert read_manifest(out)["label_keys"]["energy"] == "REF_energy"


def _partly_labelled(tmp_path):
    """Six records: full labels, forces only, energy only, a molecule (no stress)."""
    frames = []
    for seed in range(4):
        atoms, e, f, s = _emt_cell(seed)
        atoms.calc = None
        if seed != 1:
            atoms.info["E"] = e
        if seed != 2:
            atoms.arrays["F"] = f
        atoms.info["S"] = s
        frames.append(atoms)
    mol = molecule("H2O")
    mol.info["E"], mol.arrays["F"] = -14.2, np.ones((3, 3))
    frames.append(mol)
    path = tmp_path / "partial.extxyz"
    ase.io.write(path, frames)
    out = tmp_path / "partial"
    preprocess([str(path)], out, energy_key="E", forces_key="F", stress_key="S", progress=False)
    return ShardedDataset(out)


def test_partly_labelled_records_are_kept_and_masked(tmp_path):
    data = _partly_labelled(tmp_path)
    assert len(data) == 5 and data.manifest["has_energy"]
    graphs = [structure_to_graph(data[i], 4.0) for i in range(len(data))]
    batch = collate(graphs)
    assert batch[K.HAS_ENERGY].tolist() == [True, False, True, True, True]
    assert batch[K.HAS_FORCES].tolist() == [True, True, False, True, True]
    assert batch[K.HAS_STRESS].tolist() == [True, True, True, True, False]
    assert torch.isfinite(batch[K.ENERGY]).all()  # no NaN reaches the loss

    cfg = LossConfig(function="mse")
    pred = {
        K.ENERGY: batch[K.ENERGY] + torch.arange(5.0),
        K.FORCES: batch[K.FORCES] + 0.1,
        K.STRESS: batch[K.STRESS] + 0.01,
    }
    scale = torch.ones(1)
    terms = loss_terms(pred, batch, scale, cfg)
    # the missing labels' placeholders do not matter: change them and nothing moves
    changed = dict(batch)
    changed[K.ENERGY] = batch[K.ENERGY].clone()
    changed[K.ENERGY][1] = 1e6
    changed[K.FORCES] = batch[K.FORCES].clone()
    changed[K.FORCES][batch[K.BATCH] == 2] = 1e6
    again = loss_terms(pred, changed, scale, cfg)
    for k in ("energy", "forces", "stress"):
        assert again[k] == terms[k], k
    n = batch[K.N_ATOMS].double()
    labelled = [0, 2, 3, 4]
    expected = ((torch.arange(5.0) / n)[labelled] ** 2).mean()
    assert terms["energy"] == pytest.approx(float(expected))

    meter = ErrorMeter()
    meter.update(pred, changed, batch[K.ENERGY])
    assert meter.counts["energy_per_atom_mae"] == 4
    assert meter.counts["forces_mae"] == 3 * int((batch[K.BATCH] != 2).sum())


def test_statistics_fit_energies_of_labelled_records_only(tmp_path):
    data = _partly_labelled(tmp_path)
    stats = training_statistics(data, np.arange(len(data)), cutoff=4.0)
    assert stats["n_structures"] == 5 and stats["elements"] == [1, 8, 29, 79]
    # forces of four records (the energy-only one has none)
    forces = np.concatenate([data[i]["forces"] for i in (0, 1, 3, 4)])
    assert stats["force_rms"] == pytest.approx(float(np.sqrt((forces**2).mean())))


def test_a_runs_split_exports_to_extxyz_and_back(emt_dataset, tmp_path):
    """tools/export_split.py writes the recorded split with REF_* labels; preprocessing
    those files with the REF_* keys gives back the same structures and labels."""
    import sys
    from pathlib import Path

    from test_training import tiny_config

    from megagnn.training.sources import read_splits
    from megagnn.training.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from export_split import main as export_main

    Trainer(tiny_config(emt_dataset, tmp_path / "run", "train.max_steps=1")).train()
    assert export_main([str(tmp_path / "run"), "-o", str(tmp_path / "x"), "--no-progress"]) == 0
    splits = read_splits(tmp_path / "run")
    source = ShardedDataset(emt_dataset)
    keys = [
        "--energy-key",
        "REF_energy",
        "--forces-key",
        "REF_forces",
        "--stress-key",
        "REF_stress",
    ]
    for name in ("train", "test"):
        out = tmp_path / f"back-{name}"
        assert (
            preprocess_main(
                [str(tmp_path / "x" / f"{name}.extxyz"), "-o", str(out), "--no-progress", *keys]
            )
            == 0
        )
        back = ShardedDataset(out)
        assert len(back) == len(splits[name])
        for k, i in enumerate(splits[name][:5]):
            a, b = source[int(i)], back[k]
            np.testing.assert_array_equal(a["atomic_numbers"], b["atomic_numbers"])
            np.testing.assert_allclose(b["positions"], a["positions"], atol=1e-6)
            assert b["energy"] == pytest.approx(a["energy"], abs=1e-6)
            np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-6)
