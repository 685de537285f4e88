"""The dataset-format readers: small files written in each format's published layout go
through tools/preprocess_data.py into the same records, in eV and Å, with groups."""

import contextlib
import io

import numpy as np
import pytest
from ase.units import Hartree

from megagnn.data.formats import qm9
from megagnn.data.preprocess import main as preprocess_main
from megagnn.data.shards import DataError, ShardedDataset

QM9_HEADER = (
    "XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Mulliken_pop,"
    "Harmonic_Freq_cmi,RotA_GHz,RotB_GHz,RotC_GHz,Dipole_debye,Polarizability_bohr3,HOMO_au,"
    "LUMO_au,HOMO_LUMO_gap_au,R2_bohr2,ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,"
    "Enthalphy_298K_au,GibbsFreeEnergy_298K_au,Heatcapacity_Cv_cal_mol_K"
)
# rows 1 (methane), 3 (water) and 4 (acetylene, whose "0." and "1." are not JSON) of
# qm9pack 1.0.3, as the wheel ships them
QM9_ROWS = [
    '"dsgdb9nsd_000001.xyz",1,"C","InChI=1S/CH4/h1H4",5,"[4,1,0,0,0]","[\'C\',\'H\',\'H\',\'H\','
    "'H']\",\"[[-0.0126981359,1.0858041578,0.0080009958],[0.002150416,-0.0060313176,"
    "0.0019761204],[1.0117308433,1.4637511618,0.0002765748],[-0.540815069,1.4475266138,"
    '-0.8766437152],[-0.5238136345,1.4379326443,0.9063972942]]","[-0.535689,0.133921,0.133922,'
    '0.133923,0.133923]","[1341.307]",157.7118,157.70997,157.70699,0.,13.21,-0.3877,0.1171,'
    "0.5048,35.3641,0.044749,-40.47893,-40.476062,-40.475117,-40.498597,6.469",
    '"dsgdb9nsd_000003.xyz",3,"O","InChI=1S/H2O/h1H2",3,"[2,0,0,1,0]","[\'O\',\'H\',\'H\']",'
    '"[[-0.0343604951,0.9775395708,0.0076015923],[0.0647664923,0.0205721989,0.0015346341],'
    '[0.8717903737,1.3007924048,0.0006931336]]","[-0.589706,0.294853,0.294853]",'
    '"[1671.4222,3803.6305,3907.698]",799.58812,437.90386,282.94545,1.8511,6.31,-0.2928,'
    "0.0687,0.3615,19.0002,0.021375,-76.404702,-76.401867,-76.400922,-76.422349,6.002",
    '"dsgdb9nsd_000004.xyz",4,"C#C","InChI=1S/C2H2/c1-2/h1-2H",4,"[2,2,0,0,0]",'
    "\"['C','C','H','H']\",\"[[0.5995394918,0.,1.],[-0.5995394918,0.,1.],"
    '[-1.6616385861,0.,1.],[1.6616385861,0.,1.]]","[-0.207019,-0.207019,0.207019,0.207019]",'
    '"[549.7648]",0.,35.6100361,35.6100361,0.,16.28,-0.2845,0.0506,0.3351,59.5248,0.026841,'
    "-77.308427,-77.305527,-77.304583,-77.327429,8.574",
]


def _qm9_file(folder, rows=QM9_ROWS):
    path = folder / "qm9_part1.csv"
    path.write_text("\n".join([QM9_HEADER, *rows]) + "\n")
    return path


def _preprocess(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = preprocess_main([*args, "--no-progress"])
    return code, err.getvalue()


def test_qm9_rows_become_molecules_in_ev_with_one_group_each(tmp_path):
    path = _qm9_file(tmp_path)
    assert qm9.is_qm9(str(path))
    assert _preprocess(str(path), "-o", str(tmp_path / "u0"))[0] == 0  # --format auto
    data = ShardedDataset(tmp_path / "u0")
    assert len(data) == 3
    methane, water, acetylene = data[0], data[1], data[2]
    np.testing.assert_allclose(acetylene["positions"][0], [0.5995394918, 0.0, 1.0])
    np.testing.assert_array_equal(methane["atomic_numbers"], [6, 1, 1, 1, 1])
    np.testing.assert_array_equal(water["atomic_numbers"], [8, 1, 1])
    assert methane["energy"] == pytest.approx(-40.47893 * Hartree, abs=1e-9)
    np.testing.assert_allclose(water["positions"][1], [0.0647664923, 0.0205721989, 0.0015346341])
    # energy-only data: the shards hold no forces or stress at all, not NaN placeholders
    assert water["forces"] is None and water["stress"] is None and not water["pbc"].any()
    assert {"forces", "stress"}.isdisjoint(data._file(0).keys())
    assert data.record_ids().tolist() == ["1", "3", "4"]  # QM9's Index
    assert len(set(data.groups().tolist())) == 3
    assert [a.info["group"] for a in qm9.read(str(path))] == ["qm9-1", "qm9-3", "qm9-4"]
    args = (str(path), "-o", str(tmp_path / "g"), "--format", "qm9", "--energy-key", "G")
    assert _preprocess(*args)[0] == 0
    assert ShardedDataset(tmp_path / "g")[1]["energy"] == pytest.approx(-76.422349 * Hartree)


def test_qm9_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    broken = QM9_ROWS[1].replace('"[[-0.0343604951', '"[[-0.0343604951,,')
    path = _qm9_file(tmp_path, [QM9_ROWS[0], broken])
    code, err = _preprocess(str(path), "-o", str(tmp_path / "out"))
    assert code == 1 and f"{path}:3: malformed QM9 row" in err
    code, err = _preprocess(str(path), "-o", str(tmp_path / "x"), "--energy-key", "U1")
    assert code == 1 and "QM9 has U0, U, H, G" in err
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=r'pip install "megagnn\[qm9\]"'):
        qm9.installed_files()


def _water():
    """One water molecule in Å and eV, and the same in each format's units."""
    numbers = np.array([8, 1, 1])
    positions = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
    energy = -2076.5  # eV
    forces = np.array([[0.0, 0.0, 0.3], [0.0, 0.1, -0.15], [0.0, -0.1, -0.15]])  # eV/Å
    return numbers, positions, energy, forces


def _ani1x(path, conformers):
    import h5py

    numbers, positions, energy, forces = _water()
    with h5py.File(path, "w") as f:
        g = f.create_group("H2O1")
        g["atomic_numbers"] = numbers
        g["coordinates"] = np.stack([positions] * conformers)
        energies = np.full(conformers, energy / Hartree)
        energies[-1] = np.nan  # not computed at this level: masked, not a number
        g["wb97x_dz.energy"] = energies
        g["wb97x_dz.forces"] = np.stack([forces / Hartree] * conformers)


def _spice(path):
    import h5py
    from ase.units import Bohr

    numbers, positions, energy, forces = _water()
    with h5py.File(path, "w") as f:
        g = f.create_group("[H:2][O:1][H:3]")
        g["atomic_numbers"] = numbers
        g["conformations"] = (positions / Bohr)[None]
        g["dft_total_energy"] = np.array([energy / Hartree])
        g["dft_total_gradient"] = (-forces / (Hartree / Bohr))[None]
        g["smiles"] = [b"[H:2][O:1][H:3]"]
        g["subset"] = [b"water"]


def test_ani1x_and_spice_give_the_same_record_with_masks_and_groups(tmp_path):
    from megagnn.data.formats import molecules_h5

    _ani1x(tmp_path / "ani1x.h5", conformers=3)
    _spice(tmp_path / "spice.hdf5")
    assert molecules_h5.detect(str(tmp_path / "ani1x.h5")) == "ani1x"
    assert molecules_h5.detect(str(tmp_path / "spice.hdf5")) == "spice"
    for name in ("ani1x.h5", "spice.hdf5"):  # --format auto
        assert _preprocess(str(tmp_path / name), "-o", str(tmp_path / name[:5]))[0] == 0
    ani, spice = ShardedDataset(tmp_path / "ani1x"), ShardedDataset(tmp_path / "spice")
    numbers, positions, energy, forces = _water()
    assert len(ani) == 3 and len(spice) == 1
    for record in (ani[0], spice[0]):
        np.testing.assert_array_equal(record["atomic_numbers"], numbers)
        np.testing.assert_allclose(record["positions"], positions, atol=1e-12)
        assert record["energy"] == pytest.approx(energy, abs=1e-9)
        np.testing.assert_allclose(record["forces"], forces, atol=1e-12)
    assert not np.isfinite(ani[2]["energy"]) and np.isfinite(ani[2]["forces"]).all()
    assert len(set(ani.groups().tolist())) == 1  # the conformers of one molecule


def test_a_missing_level_of_theory_is_named(tmp_path):
    _ani1x(tmp_path / "ani1x.h5", conformers=1)
    args = (str(tmp_path / "ani1x.h5"), "-o", str(tmp_path / "out"), "--energy-key", "ccsd.energy")
    code, err = _preprocess(*args)
    assert code == 1 and "group 'H2O1': malformed ani1x record" in err and "ccsd.energy" in err


def _qm7x(path):
    """Two molecules in QM7-X's layout (file -> molecule -> conformer): water twice, then
    one more water under another molecule id."""
    import h5py

    numbers, positions, energy, forces = _water()
    with h5py.File(path, "w") as f:
        for molecule, conformers in (
            ("1", ("Geom-m1-i1-c1-opt", "Geom-m1-i1-c1-1")),
            ("7", ("Geom-m7-i1-c1-opt",)),
        ):
            for name in conformers:
                g = f.create_group(f"{molecule}/{name}")
                g["atNUM"] = numbers
                g["atXYZ"] = positions
                g["ePBE0+MBD"] = np.array([energy])
                g["eDFTB+MBD"] = np.array([energy + 1.0])
                g["totFOR"] = forces


def _records_equal(a, b):
    np.testing.assert_array_equal(a["atomic_numbers"], b["atomic_numbers"])
    for key in ("positions", "cell", "forces", "stress"):
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12, err_msg=key)
    assert a["energy"] == pytest.approx(b["energy"], abs=1e-9)
    np.testing.assert_array_equal(a["pbc"], b["pbc"])


def test_qm7x_conformers_in_ev_with_one_group_per_molecule(tmp_path):
    from megagnn.data.formats import qm7x

    _qm7x(tmp_path / "1000.hdf5")
    _ani1x(tmp_path / "ani1x.h5", conformers=2)
    assert qm7x.is_qm7x(str(tmp_path / "1000.hdf5"))
    assert not qm7x.is_qm7x(str(tmp_path / "ani1x.h5"))
    assert _preprocess(str(tmp_path / "1000.hdf5"), "-o", str(tmp_path / "q"))[0] == 0
    assert _preprocess(str(tmp_path / "ani1x.h5"), "-o", str(tmp_path / "a"))[0] == 0
    data, ani = ShardedDataset(tmp_path / "q"), ShardedDataset(tmp_path / "a")
    assert len(data) == 3
    _records_equal(data[0], ani[0])  # the same water in QM7-X's units and in ANI-1x's
    groups = data.groups().tolist()
    assert groups[0] == groups[1] != groups[2]
    assert data.record_ids().tolist() == [
        "Geom-m1-i1-c1-1",  # HDF5 lists groups by name
        "Geom-m1-i1-c1-opt",
        "Geom-m7-i1-c1-opt",
    ]
    # another level: its energy, and no forces (totFOR belongs to PBE0+MBD)
    args = ("-o", str(tmp_path / "dftb"), "--energy-key", "eDFTB+MBD")
    assert _preprocess(str(tmp_path / "1000.hdf5"), *args)[0] == 0
    dftb = ShardedDataset(tmp_path / "dftb")[0]
    assert dftb["energy"] == pytest.approx(data[0]["energy"] + 1.0) and dftb["forces"] is None
    # whole molecules per chunk: 2 workers and chunks of 1 give the same records
    args = ("-o", str(tmp_path / "w"), "--workers", "2", "--shard-size", "1")
    assert _preprocess(str(tmp_path / "1000.hdf5"), *args)[0] == 0
    split = ShardedDataset(tmp_path / "w")
    assert split.record_ids().tolist() == data.record_ids().tolist()
    assert split.groups().tolist() == groups


def _silicon():
    """Two-atom Si with labels in eV, Å, eV/Å and eV/Å^3 (ASE's sign)."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.positions[1] += [0.05, -0.02, 0.01]
    forces = np.array([[0.1, -0.2, 0.05], [-0.1, 0.2, -0.05]])
    stress = np.array([[0.01, 0.002, 0.0], [0.002, -0.003, 0.001], [0.0, 0.001, 0.004]])
    return atoms, -10.85, forces, stress


def _mptrj(path, broken=False):
    """Si in MPtrj's layout: two frames of mp-149, one of mp-1 (fractional sites only)."""
    import json

    from ase.units import GPa

    atoms, energy, forces, stress = _silicon()
    kbar = stress / (-0.1 * GPa)  # VASP's sign and unit

    def frame(xyz=True):
        sites = [
            {
                "species": [{"element": "Si", "occu": 1}],
                "abc": atoms.get_scaled_positions()[i].tolist(),
                **({"xyz": atoms.positions[i].tolist()} if xyz else {}),
                "label": "Si",
                "properties": {"magmom": 0.0},
            }
            for i in range(2)
        ]
        structure = {
            "@module": "pymatgen.core.structure",
            "lattice": {"matrix": atoms.cell[:].tolist(), "pbc": [True, True, True]},
            "sites": sites,
        }
        return {
            "structure": structure,
            "uncorrected_total_energy": energy - 0.5,
            "corrected_total_energy": energy,
            "energy_per_atom": energy / 2,
            "force": forces.tolist(),
            "stress": kbar.tolist(),
            "magmom": None,
            "mp_id": "",
        }

    data = {"mp-149": {"mp-149-0-0": frame(), "mp-149-1-0": frame()}, "mp-1": {"x": frame(False)}}
    text = json.dumps(data, indent=1)
    path.write_text(text[:-40] if broken else text)


def test_mptrj_frames_convert_kbar_stress_to_ase_units_with_mp_id_groups(tmp_path):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from megagnn.data.formats import mptrj

    _mptrj(tmp_path / "MPtrj.json")
    atoms, energy, forces, stress = _silicon()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    ase.io.write(tmp_path / "si.extxyz", atoms)
    assert mptrj.is_mptrj(str(tmp_path / "MPtrj.json"))
    assert _preprocess(str(tmp_path / "MPtrj.json"), "-o", str(tmp_path / "m"))[0] == 0
    assert _preprocess(str(tmp_path / "si.extxyz"), "-o", str(tmp_path / "x"))[0] == 0
    data, ref = ShardedDataset(tmp_path / "m"), ShardedDataset(tmp_path / "x")[0]
    assert len(data) == 3
    for k in range(3):  # xyz or fractional sites alike
        _records_equal(data[k], ref)
    groups = data.groups().tolist()
    assert groups[0] == groups[1] != groups[2]
    assert data.record_ids().tolist() == ["mp-149-0-0", "mp-149-1-0", "x"]
    args = ("-o", str(tmp_path / "u"), "--energy-key", "uncorrected")
    assert _preprocess(str(tmp_path / "MPtrj.json"), *args)[0] == 0
    assert ShardedDataset(tmp_path / "u")[0]["energy"] == pytest.approx(energy - 0.5)
    # the stream holds one mp-id at a time: a file cut short is named, with where
    _mptrj(tmp_path / "cut.json", broken=True)
    code, err = _preprocess(
        str(tmp_path / "cut.json"), "-o", str(tmp_path / "c"), "--format", "mptrj"
    )
    assert code == 1 and "cut.json: malformed JSON at character" in err
    assert len(err.strip().splitlines()) == 1


def test_mptrj_stream_reads_entries_larger_than_its_buffer(tmp_path, monkeypatch):
    from megagnn.data.formats import mptrj

    monkeypatch.setattr(mptrj, "BLOCK", 7)  # every entry spans many reads
    _mptrj(tmp_path / "MPtrj.json")
    frames = list(mptrj.read(str(tmp_path / "MPtrj.json")))
    assert [a.info["id"] for a in frames] == ["mp-149-0-0", "mp-149-1-0", "x"]


def test_aselmdb_rows_written_by_ase_db_backends_keep_labels_charge_and_spin(tmp_path):
    pytest.importorskip("ase_db_backends")
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase_db_backends.aselmdb import LMDBDatabase

    numbers, positions, energy, forces = _water()
    water = Atoms(numbers=numbers, positions=positions)
    water.calc = SinglePointCalculator(water, energy=energy, forces=forces)
    si, si_energy, si_forces, si_stress = _silicon()
    si.calc = SinglePointCalculator(si, energy=si_energy, forces=si_forces, stress=si_stress)
    with LMDBDatabase(tmp_path / "omol.aselmdb") as db:  # as OMol25 and OMat24 store rows
        for k in range(3):
            db.write(water, data={"charge": 0, "spin": 1, "sid": f"w{k}", "parent": "water"})
        db.write(si, parent="si")
    ase.io.write(tmp_path / "ref.extxyz", [water, si])
    args = ("-o", str(tmp_path / "l"), "--group-key", "parent")
    assert _preprocess(str(tmp_path / "omol.aselmdb"), *args)[0] == 0
    assert _preprocess(str(tmp_path / "ref.extxyz"), "-o", str(tmp_path / "r"))[0] == 0
    data, ref = ShardedDataset(tmp_path / "l"), ShardedDataset(tmp_path / "r")
    assert len(data) == 4
    _records_equal(data[0], ref[0])
    _records_equal(data[3], ref[1])  # stress in eV/Å^3, ASE's sign
    assert data[0]["charge"] == 0 and data[0]["spin"] == 1 and np.isnan(data[3]["charge"])
    assert data.record_ids().tolist() == ["w0", "w1", "w2", "omol.aselmdb#4"]
    groups = data.groups().tolist()
    assert groups[0] == groups[1] == groups[2] != groups[3]
    # rows per chunk: 2 workers, chunks of 1 row, the same dataset
    args = (
        "-o",
        str(tmp_path / "w"),
        "--group-key",
        "parent",
        "--workers",
        "2",
        "--shard-size",
        "1",
    )
    assert _preprocess(str(tmp_path / "omol.aselmdb"), *args)[0] == 0
    assert ShardedDataset(tmp_path / "w").record_ids().tolist() == data.record_ids().tolist()
    (tmp_path / "bad.aselmdb").write_bytes(b"not an lmdb file" * 64)
    code, err = _preprocess(str(tmp_path / "bad.aselmdb"), "-o", str(tmp_path / "b"))
    assert code == 1 and "bad.aselmdb: not a readable ASE-LMDB file" in err


def test_a_malformed_qm7x_conformer_is_named_in_one_line(tmp_path):
    import h5py

    _qm7x(tmp_path / "1000.hdf5")
    with h5py.File(tmp_path / "1000.hdf5", "a") as f:
        del f["7/Geom-m7-i1-c1-opt/atXYZ"]
        f["7/Geom-m7-i1-c1-opt/atXYZ"] = np.zeros((2, 3))  # 3 atoms, 2 positions
    code, err = _preprocess(str(tmp_path / "1000.hdf5"), "-o", str(tmp_path / "out"))
    assert code == 1 and "7/Geom-m7-i1-c1-opt: malformed QM7-X record" in err
    assert len(err.strip().splitlines()) == 1
