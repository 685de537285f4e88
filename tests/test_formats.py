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
    assert not np.isfinite(water["forces"]).any() and not water["pbc"].any()  # no forces
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
