"""The harder built-in dataset: GFN1-xTB molecules, clusters and crystals."""

import numpy as np
import pytest

pytest.importorskip("tblite", reason="the xTB data needs tblite (pip install tblite)")

from megagnn.data import xtb  # noqa: E402


def test_generation_is_the_same_for_any_number_of_workers(monkeypatch):
    monkeypatch.setattr(xtb, "CHUNK", 3)  # 3 chunks over 2 workers
    one = list(xtb.generate(8, seed=5, progress=False, workers=1))
    two = list(xtb.generate(8, seed=5, progress=False, workers=2))
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert a.info["group"] == b.info["group"]
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-7)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)


def test_structures_are_labelled_grouped_and_plausible():
    structures, _ = xtb.generate_chunk(seed=1, chunk=0, size=30)
    assert len(structures) == 30
    kinds = {s.info["group"].split("-")[0] for s in structures}
    assert kinds <= {"mol", "cluster", "crystal"} and len(kinds) >= 2
    for s in structures:
        assert np.isfinite(s.get_potential_energy()) and not xtb.too_close(s)
        assert np.abs(s.get_forces()).max() <= xtb.MAX_FORCE
        if s.pbc.all():
            assert s.get_stress().shape == (6,)
            assert xtb.heights(s.cell[:]).min() >= xtb.MIN_WIDTH or len(s) * 2 > xtb.MAX_CELL_ATOMS


def test_crystals_are_widened_until_gamma_point_sampling_is_sane():
    from ase.build import bulk

    wide = xtb._widened(bulk("Al", "fcc", a=4.05))  # 1-atom primitive cell, 2.9 Å wide
    assert xtb.heights(wide.cell[:]).min() >= xtb.MIN_WIDTH and len(wide) == 8


def test_qm9_geometries_get_xtb_forces_two_structures_per_molecule_grouped(tmp_path, monkeypatch):
    from test_formats import QM9_HEADER, QM9_ROWS

    from megagnn.data import qm9_xtb

    csv = tmp_path / "qm9_part1.csv"
    csv.write_text("\n".join([QM9_HEADER, *QM9_ROWS]) + "\n")
    monkeypatch.setattr(qm9_xtb, "CHUNK", 1)  # a chunk per molecule, over 2 workers
    cache = tmp_path / "chunks"
    one = list(qm9_xtb.generate(4, 2, progress=False, workers=1, files=[str(csv)], cache=cache))
    two = list(qm9_xtb.generate(4, seed=2, progress=False, workers=2, files=[str(csv)]))
    assert [a.info["id"] for a in one] == [a.info["id"] for a in two]
    assert len(one) == 4  # N structures, rejected draws made up by further molecules
    # a rerun reads the chunks the first one kept and computes only what is missing; a
    # larger N extends the same order
    (cache / "seed2" / "chunk-00001.json").unlink()
    computed = []
    original = qm9_xtb.generate_chunk
    monkeypatch.setattr(qm9_xtb, "generate_chunk", lambda *a: computed.append(a[1]) or original(*a))
    again = list(qm9_xtb.generate(5, 2, progress=False, files=[str(csv)], cache=cache))
    assert 1 in computed and 0 not in computed
    assert [a.info["id"] for a in again[:4]] == [a.info["id"] for a in one]
    # the recomputed chunk repeats the first run up to xTB's own run-to-run noise (~1e-13 eV)
    assert [a.get_potential_energy() for a in again[:4]] == pytest.approx(
        [a.get_potential_energy() for a in one], rel=0, abs=1e-8
    )
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-7)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)
        assert np.isfinite(a.get_forces()).all() and not a.pbc.any()
        index, kind = a.info["id"].removeprefix("qm9-").split("-")
        assert a.info["group"] == f"qm9-{index}" and kind in ("rattled", "md")
    assert {a.info["group"] for a in again} <= {"qm9-1", "qm9-3", "qm9-4"}
    # QM9 running out gives what there is
    assert len(list(qm9_xtb.generate(100, seed=2, progress=False, files=[str(csv)]))) <= 6
