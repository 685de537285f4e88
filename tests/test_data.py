import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from megagnn.data import DataError, ShardedDataset, read_manifest
from megagnn.data.neighbors import neighbor_list
from megagnn.data.preprocess import main as preprocess_main
from megagnn.data.preprocess import merge, preprocess
from megagnn.data.sampler import BudgetBatchSampler, pack_batches
from megagnn.data.splits import assert_groups_disjoint, group_hash, split_by_group, train_subset
from megagnn.data.statistics import training_statistics


def test_round_trip(emt_extxyz, emt_dataset):
    originals = ase.io.read(emt_extxyz, index=":")
    data = ShardedDataset(emt_dataset)
    assert len(data) == len(originals) == 40
    assert len(data.manifest["shards"]) == 2
    for k in (0, 24, 25, 39):  # both sides of the shard boundary
        rec, ref = data[k], originals[k]
        np.testing.assert_array_equal(rec["atomic_numbers"], ref.numbers)
        np.testing.assert_array_equal(rec["positions"], ref.positions)
        np.testing.assert_array_equal(rec["forces"], ref.get_forces())
        np.testing.assert_array_equal(rec["cell"], ref.cell[:])
        assert rec["energy"] == ref.get_potential_energy()
        np.testing.assert_allclose(
            rec["stress"].flat[[0, 4, 8, 5, 2, 1]], ref.get_stress(), rtol=0, atol=0
        )
    np.testing.assert_array_equal(data.sizes("n_atoms"), [len(a) for a in originals])
    counts = [len(neighbor_list(a.positions, a.cell[:], a.pbc, 4.0)[0][0]) for a in originals]
    np.testing.assert_array_equal(data.sizes("n_edges"), counts)


def test_statistics_are_least_squares_over_the_training_records_only(emt_extxyz, emt_dataset):
    originals = ase.io.read(emt_extxyz, index=":")
    data = ShardedDataset(emt_dataset)
    train = np.arange(3, 37, 2)  # both shards, not contiguous
    stats = training_statistics(data, train, cutoff=4.0)
    chosen = [originals[i] for i in train]
    elements = stats["elements"]
    a = np.array([[np.sum(at.numbers == z) for z in elements] for at in chosen], float)
    e = np.array([at.get_potential_energy() for at in chosen])
    expected = np.linalg.lstsq(a, e, rcond=None)[0]
    got = np.array([stats["atomic_energies"][str(z)] for z in elements])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    residual = (e - a @ expected) / a.sum(1)
    assert stats["energy_per_atom_residual_rms"] == pytest.approx(
        np.sqrt(np.mean(residual**2)), rel=1e-4
    )
    forces = np.concatenate([at.get_forces() for at in chosen])
    assert stats["force_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)))
    assert stats["n_atoms"] == sum(len(at) for at in chosen)
    edges = sum(len(neighbor_list(at.positions, at.cell[:], at.pbc, 4.0)[0][0]) for at in chosen)
    assert stats["avg_num_neighbors"] == pytest.approx(edges / stats["n_atoms"])
    # without edge counts at this cutoff, neighbour lists of a sample give the same average
    sampled = training_statistics(data, train, cutoff=4.0 + 1e-9, sample=len(train))
    assert sampled["avg_num_neighbors"] == pytest.approx(stats["avg_num_neighbors"], rel=1e-6)
    assert "sampled" in sampled["avg_num_neighbors_from"]
    # the whole data gives other statistics: the selection is what is fitted
    every = training_statistics(data, np.arange(len(data)), cutoff=4.0)
    assert every["force_rms"] != pytest.approx(stats["force_rms"], rel=1e-6)


def _labelled(atoms, energy=-1.0, forces=None, stress=None):
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=energy,
        forces=np.zeros((len(atoms), 3)) if forces is None else forces,
        stress=np.zeros(6) if stress is None else stress,
    )
    return atoms


def _good():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    return _labelled(atoms)


def _bad_records():
    nan_pos = _good()
    nan_pos.positions[1, 2] = np.nan
    no_energy = bulk("Cu", "fcc", a=3.6, cubic=True)
    no_energy.calc = None
    overlap = _good()
    overlap.positions[1] = overlap.positions[0] + [0.1, 0, 0]
    zero_cell = _labelled(Atoms("Cu2", positions=[[0, 0, 0], [2, 0, 0]], cell=[3, 3, 0], pbc=True))
    nan_force = _good()
    nan_force.calc.results["forces"][0, 0] = np.inf
    return {
        "positions contain NaN": nan_pos,
        "no energy": no_energy,
        "overlap": overlap,
        "zero volume|zero cell": zero_cell,
        "forces contain NaN or inf": nan_force,
    }


@pytest.mark.parametrize("message", list(_bad_records()))
def test_bad_record_is_rejected_with_file_and_index(tmp_path, message):
    bad = _bad_records()[message]
    path = tmp_path / "in.extxyz"
    ase.io.write(path, [_good(), _good(), bad, _good()])
    with pytest.raises(DataError, match=rf"in\.extxyz record 2: .*({message})"):
        preprocess([str(path)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_skip_invalid_drops_and_counts(tmp_path, capsys):
    path = tmp_path / "in.extxyz"
    records = [_good(), *_bad_records().values(), _good()]
    ase.io.write(path, records)
    assert (
        preprocess_main([str(path), "-o", str(tmp_path / "out"), "--skip-invalid", "--no-progress"])
        == 0
    )
    m = read_manifest(tmp_path / "out")
    assert m["n_structures"] == 2 and m["skipped"] == 5
    assert "record 2" in capsys.readouterr().err


def test_unreadable_and_missing_inputs(tmp_path):
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("not a structure file\n1 2 3\n")
    assert preprocess_main([str(garbage), "-o", str(tmp_path / "a"), "--no-progress"]) == 1
    with pytest.raises(DataError, match="garbage.extxyz"):
        preprocess([str(garbage)], tmp_path / "b", progress=False)
    with pytest.raises(DataError, match="no file matches"):
        preprocess([str(tmp_path / "*.traj")], tmp_path / "c", progress=False)


def test_reads_ase_database_and_globs(tmp_path):
    from ase.db import connect

    db = connect(tmp_path / "x.db")
    for _ in range(3):
        db.write(_good())
    ase.io.write(tmp_path / "a.extxyz", [_good()])
    ase.io.write(tmp_path / "b.extxyz", [_good(), _good()])
    m = preprocess(
        [str(tmp_path / "x.db"), str(tmp_path / "*.extxyz")], tmp_path / "out", progress=False
    )
    assert m["n_structures"] == 6


def test_crash_mid_write_leaves_nothing_complete(tmp_path, monkeypatch):
    path = tmp_path / "in.extxyz"
    ase.io.write(path, [_good() for _ in range(7)])

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("megagnn.data.shards.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(path)], tmp_path / "out", shard_size=3, progress=False)
    assert not list((tmp_path / "out").glob("*.h5"))  # only a .tmp file, never a shard
    assert not (tmp_path / "out" / "dataset.json").exists()
    with pytest.raises(DataError, match="did not finish"):
        ShardedDataset(tmp_path / "out")


def test_refuses_to_overwrite_a_dataset(emt_dataset, emt_extxyz):
    with pytest.raises(DataError, match="already holds a dataset"):
        preprocess([str(emt_extxyz)], emt_dataset, progress=False)


def test_corrupt_shard_and_manifest_are_named(tmp_path, emt_extxyz):
    out = tmp_path / "d"
    preprocess([str(emt_extxyz)], out, shard_size=25, progress=False)
    name = read_manifest(out)["shards"][1]["file"]
    shard = out / name
    shard.write_bytes(shard.read_bytes()[:1000])
    data = ShardedDataset(out)
    data[0]
    with pytest.raises(DataError, match=name):
        data[30]
    (out / "dataset.json").write_text("{ truncated")
    with pytest.raises(DataError, match="dataset.json is corrupt"):
        ShardedDataset(out)
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "shards": [{"file": "shard-00009.h5", "n_structures": 1, "n_atoms": 1}],
            }
        )
    )
    with pytest.raises(DataError, match="shard-00009.h5 .* is missing"):
        ShardedDataset(out)


def _rotated_slab():
    """A two-layer fcc slab, cell and atoms rotated off the axes and moved to negative
    coordinates (vesin before 0.5.8 missed pairs in such mixed-periodicity boxes)."""
    slab = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
    slab.cell[2] = [0, 0, 12.0]  # vacuum, not periodic
    slab.pbc = [True, True, False]
    slab.rotate(37, "z", rotate_cell=True)
    slab.rotate(21, "x", rotate_cell=True)
    slab.translate([-7.0, -3.0, -5.0])
    return slab


def _pairs(i, j, shifts):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, shifts.tolist()), strict=True))


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Cu", "fcc", a=3.6) * (2, 1, 3),  # triclinic
        bulk("Cu", "hcp", a=2.5, c=4.1),  # hexagonal, cell shorter than the cutoff
        Atoms(
            "Cu3",
            positions=[[0, 0, 0], [2, 0.5, 0], [0.5, 2.2, 1.0]],
            cell=[5, 6, 0],
            pbc=[True, True, False],
        ),  # slab with a zero vector out of plane
        Atoms(
            "Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[0, 7, 0], pbc=[False, True, False]
        ),  # wire
        Atoms("CuAu", positions=[[0, 0, 0], [9, 0, 0]]),  # two isolated atoms
        Atoms(
            "Cu4",
            positions=[[-3.1, -2.2, -1.5], [-0.4, -4.9, -2.8], [-4.4, -0.3, -0.2], [-1, -1, -4]],
            cell=[5, 6, 0],
            pbc=[True, True, False],
        ),  # slab at negative coordinates
        _rotated_slab(),
    ],
    ids=["triclinic", "small-hcp", "slab", "wire", "isolated", "slab-negative", "slab-rotated"],
)
def test_neighbor_list_matches_ase(atoms):
    atoms.rattle(0.05, seed=4)
    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, 4.0)
    i, j, s = ase_neighbor_list("ijS", atoms, 4.0)
    assert _pairs(edge_index[1], edge_index[0], shifts) == _pairs(i, j, s)
    assert np.all(np.diff(edge_index[1]) >= 0)  # sorted by receiver


def test_split_keeps_groups_whole_seeded_and_stable_when_data_is_appended():
    rng = np.random.default_rng(0)
    groups = np.array([group_hash(f"traj-{k}") for k in rng.integers(0, 400, 3000)], np.uint64)
    s = split_by_group(groups, [0.8, 0.1, 0.1], seed=3)
    every = np.concatenate(list(s.values()))
    assert sorted(every.tolist()) == list(range(3000))
    assert_groups_disjoint(s, groups)
    n_groups = {k: len(np.unique(groups[v])) for k, v in s.items()}
    assert 0.7 < n_groups["train"] / 400 < 0.9 and n_groups["val"] > 20 and n_groups["test"] > 20
    again = split_by_group(groups, [0.8, 0.1, 0.1], seed=3)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = split_by_group(groups, [0.8, 0.1, 0.1], seed=4)
    assert not np.array_equal(s["test"], other["test"])
    # new shards (new groups and more frames of old ones) move no old record between splits
    more = np.array([group_hash(f"traj-{k}") for k in rng.integers(0, 600, 1000)], np.uint64)
    grown = split_by_group(np.concatenate([groups, more]), [0.8, 0.1, 0.1], seed=3)
    for k in s:
        np.testing.assert_array_equal(grown[k][grown[k] < 3000], s[k])
    with pytest.raises(AssertionError, match="is in both"):
        assert_groups_disjoint({"train": np.array([0]), "test": np.array([1])}, groups[[7, 7]])


def test_preprocess_reads_groups_from_the_info_key(tmp_path):
    records = []
    for k in range(6):
        atoms = _good()
        atoms.info["traj"] = f"t{k // 3}"
        records.append(atoms)
    ase.io.write(tmp_path / "in.extxyz", records)
    preprocess([str(tmp_path / "in.extxyz")], tmp_path / "a", group_key="traj", progress=False)
    preprocess([str(tmp_path / "in.extxyz")], tmp_path / "b", progress=False)  # no such key
    by_key, alone = ShardedDataset(tmp_path / "a").groups(), ShardedDataset(tmp_path / "b").groups()
    assert len(set(by_key.tolist())) == 2 and by_key[0] == by_key[2] != by_key[3]
    assert by_key[0] == group_hash("t0")
    assert len(set(alone.tolist())) == 6  # each structure its own group


def test_built_in_data_groups_md_frames_and_no_group_crosses_splits(emt_dataset):
    from megagnn.config import load_config
    from megagnn.training.sources import DataSplits

    cfg = load_config(None, [f"data.path={emt_dataset}", "data.split=[0.7, 0.15, 0.15]"])
    data = DataSplits(cfg)
    groups = data.dataset.groups()
    _, counts = np.unique(groups, return_counts=True)
    assert counts.max() == 5  # the frames of one MD trajectory share a group
    assert_groups_disjoint(data.indices, groups)
    assert all(len(v) for v in data.indices.values())


def _dataset_arrays(path):
    data = ShardedDataset(path)
    records = [data[i] for i in range(len(data))]
    return data.groups(), data.sizes("n_edges"), records


@pytest.mark.parametrize("how", ["workers", "parts"])
def test_parallel_preprocessing_writes_the_serial_dataset(tmp_path, emt_extxyz, how):
    serial = tmp_path / "serial"
    preprocess([str(emt_extxyz)], serial, shard_size=7, cutoff=4.0, progress=False)
    out = tmp_path / how
    if how == "workers":
        preprocess([str(emt_extxyz)], out, shard_size=7, cutoff=4.0, progress=False, workers=2)
    else:
        for k in (2, 0):  # any order, independent jobs
            preprocess([str(emt_extxyz)], out, 7, 4.0, progress=False, part=(k, 3))
        with pytest.raises(DataError, match=r"parts \[1\] of 3 have not finished"):
            merge(out)
        preprocess([str(emt_extxyz)], out, 7, 4.0, progress=False, part=(1, 3))
        merge(out)
    a, b = _dataset_arrays(serial), _dataset_arrays(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for ra, rb in zip(a[2], b[2], strict=True):
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key])
    ma, mb = read_manifest(serial), read_manifest(out)
    assert ma["n_structures"] == mb["n_structures"] == 40 and ma["elements"] == mb["elements"]


def test_merge_refuses_parts_run_with_other_options(tmp_path, emt_extxyz):
    out = tmp_path / "d"
    preprocess([str(emt_extxyz)], out, 10, 4.0, progress=False, part=(0, 2))
    preprocess([str(emt_extxyz)], out, 10, 5.0, progress=False, part=(1, 2))
    with pytest.raises(DataError, match="options"):
        merge(out)


def test_pack_batches_respects_budgets():
    rng = np.random.default_rng(0)
    atoms, edges = rng.integers(1, 40, 200), rng.integers(0, 900, 200)
    batches = pack_batches(np.arange(200), atoms, 100, edges, 2000)
    assert np.array_equal(np.concatenate(batches), np.arange(200))
    for b in batches:
        assert len(b) == 1 or (atoms[b].sum() <= 100 and edges[b].sum() <= 2000)
    # an oversized structure gets a batch of its own
    assert [b.tolist() for b in pack_batches(np.arange(3), np.array([5, 50, 5]), 10)] == [
        [0],
        [1],
        [2],
    ]


def test_sampler_is_deterministic_and_splits_ranks():
    idx = np.arange(50, 150)
    sizes = np.random.default_rng(1).integers(1, 30, len(idx))
    full = BudgetBatchSampler(idx, sizes, 64, seed=7)
    e0, e1 = full.batches(0), full.batches(1)
    assert [b.tolist() for b in e0] == [b.tolist() for b in full.batches(0)]
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    assert sorted(np.concatenate(e0).tolist()) == idx.tolist()
    ranks = [
        BudgetBatchSampler(idx, sizes, 64, seed=7, rank=r, world_size=2).batches(0)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(np.concatenate(ranks[0]).tolist()) & set(np.concatenate(ranks[1]).tolist())


def test_collate_refuses_edges_not_sorted_by_receiver():
    from megagnn import keys as K
    from megagnn.data import collate
    from megagnn.data.graph import atoms_to_graph

    g = atoms_to_graph(bulk("Cu", "fcc", a=3.6, cubic=True), 3.0)
    assert collate([g, g])[K.EDGE_INDEX].shape[1] == 2 * g[K.EDGE_INDEX].shape[1]
    g[K.EDGE_INDEX] = g[K.EDGE_INDEX].flip(1)
    with pytest.raises(ValueError, match="sorted by receiver"):
        collate([g])


def test_train_fractions_are_nested_seeded_subsets_of_whole_groups():
    train = np.arange(0, 4000, 2)
    groups = np.array([group_hash(f"g{k // 4}") for k in range(len(train))], np.uint64)  # 4 each
    quarter = train_subset(train, groups, 0.25, seed=3)
    half = train_subset(train, groups, 0.5, seed=3)
    assert 0.2 < len(quarter) / len(train) < 0.3 and 0.45 < len(half) / len(train) < 0.55
    assert set(quarter) <= set(half) <= set(train)
    assert len(quarter) % 4 == 0  # whole groups
    assert not np.array_equal(quarter, train[: len(quarter)])  # drawn, not the first records
    np.testing.assert_array_equal(train_subset(train, groups, 0.25, seed=3), quarter)
    assert len(train_subset(train, groups, 1e-9, seed=0)) == 4  # at least one group
    assert train_subset(train, groups, 1.0, seed=0) is train


def test_open_shards_are_bounded_and_reads_survive_eviction(tmp_path, emt_extxyz):
    """A rank that visits every shard keeps at most max_open HDF5 files (and their chunk
    caches) open, so memory does not grow with the number of shards; reads stay exact."""
    out = tmp_path / "many"
    preprocess([str(emt_extxyz)], out, shard_size=3, progress=False)  # 14 shards
    bounded, unbounded = ShardedDataset(out, max_open=2), ShardedDataset(out, max_open=1000)
    assert len(bounded.manifest["shards"]) > 10
    order = np.random.default_rng(0).permutation(len(bounded))
    for i in order:
        a, b = bounded[int(i)], unbounded[int(i)]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert len(bounded._files) <= 2 and len(bounded._offsets) <= 2
    np.testing.assert_array_equal(bounded.sizes(), unbounded.sizes())
    assert len(unbounded._files) == len(unbounded.manifest["shards"])
