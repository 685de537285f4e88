"""The inference package (AOTInductor .pt2): same energies, forces and stress as the model it
was compiled from, for structures of other sizes than the tracing example, through the ASE
calculator and through the C++ runner built by CMakeLists.txt."""

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.stress import full_3x3_to_voigt_6_stress

from megagnn import keys as K
from megagnn.config import ModelConfig
from megagnn.data import atoms_to_graph, to_device
from megagnn.elements import UnknownElementError
from megagnn.evaluate import main as evaluate_main
from megagnn.inference import MegaGNNCalculator, Package, export_package
from megagnn.inference.package import PackageError, graph_inputs
from megagnn.models import build_model

ROOT = Path(__file__).parents[1]
TOL = dict(rtol=1e-9, atol=1e-12)

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="AOTInductor needs a C++ compiler",
)


@pytest.fixture(scope="module", autouse=True)
def threaded_kernels():
    """Packages compiled here have threaded kernels, as on any machine with more than one
    core, whatever thread count the suite runs with: Inductor writes other (vectorised,
    atomic) code for them than for one thread."""
    with torch._inductor.config.patch({"cpp.threads": 2}):
        yield


def structures() -> dict[str, Atoms]:
    cell = bulk("Cu", "fcc", a=3.65) * (3, 2, 2)
    cell.numbers[::4] = 79
    cell.rattle(0.05, seed=1)
    cell.positions[0] += [5.0, -4.0, 0.5]  # an atom outside the cell
    skew = bulk("Au", "fcc", a=4.0)  # one atom, 3 x 1 x 1 neighbours through images
    ethanol = molecule("CH3CH2OH")
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=3.0)  # periodic in x and y only
    slab.rattle(0.05, seed=2)
    return {"periodic": cell, "one-atom": skew, "molecule": ethanol, "slab": slab}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(family="painn", hidden=16, layers=2, num_rbf=8, radial_hidden=8, cutoff=4.0)
    model = build_model(cfg).double().eval()
    model.set_statistics(0, {29: -3.0, 79: -2.5, 1: -13.0, 6: -1000.0, 8: -430.0}, 0.5, 10.0)
    path = export_package(model, tmp_path_factory.mktemp("package") / "model.pt2")
    return model, path


def expected(model, atoms: Atoms) -> dict[str, np.ndarray]:
    batch = to_device(atoms_to_graph(atoms, model.cfg.cutoff), "cpu", torch.float64)
    out = model(batch, compute_stress=bool(atoms.pbc.all()))
    res = {"energy": out[K.ENERGY][0].item(), "forces": out[K.FORCES].detach().numpy()}
    if K.STRESS in out:
        res["stress"] = out[K.STRESS][0].detach().numpy()
    return res


@pytest.mark.parametrize("name", ["periodic", "one-atom", "molecule", "slab"])
def test_package_matches_the_model(packaged, name):
    model, path = packaged
    package = Package(path)
    assert package.cutoff == 4.0 and package.has_stress
    assert package.metadata["elements"] == "1,6,8,29,79"
    atoms = structures()[name]
    batch = to_device(atoms_to_graph(atoms, 4.0), "cpu", torch.float64)
    energy, forces, stress, energies = package(*graph_inputs(batch))
    ref = expected(model, atoms)
    torch.testing.assert_close(energy.item(), ref["energy"], **TOL)
    torch.testing.assert_close(energies.sum().item(), ref["energy"], **TOL)
    assert energies.shape == (len(atoms),) and package.has_energies
    torch.testing.assert_close(forces.numpy(), ref["forces"], **TOL)
    if atoms.pbc.all():
        torch.testing.assert_close(stress.numpy(), ref["stress"], **TOL)
    else:
        assert not stress.any()


def test_calculator_runs_the_package(packaged):
    model, path = packaged
    for atoms in structures().values():
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = MegaGNNCalculator(model), MegaGNNCalculator(str(path))
        np.testing.assert_allclose(b.get_potential_energy(), a.get_potential_energy(), rtol=1e-9)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), rtol=1e-9, atol=1e-12)
        if atoms.pbc.all():
            np.testing.assert_allclose(b.get_stress(), a.get_stress(), rtol=1e-9, atol=1e-12)
        # per-atom energies: each atom's share, summing to the energy
        per_atom = a.get_potential_energies()
        assert per_atom.shape == (len(atoms),)
        np.testing.assert_allclose(per_atom.sum(), a.get_potential_energy(), rtol=1e-12)
        np.testing.assert_allclose(b.get_potential_energies(), per_atom, rtol=1e-9, atol=1e-12)


def test_many_structures_per_call_match_one_by_one(packaged):
    """The batched API packs structures into atom-budget batches (here several, one
    structure larger than the budget alone) and gives what one call per structure gives."""
    model, path = packaged
    many = [*structures().values()] * 2
    for calc, budget in ((MegaGNNCalculator(model), 10), (MegaGNNCalculator(str(path)), 10)):
        assert max(len(a) for a in many) > budget
        for atoms, got in zip(many, calc.predict(many, max_atoms=budget), strict=True):
            ref = expected(model, atoms)
            np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-9)
            np.testing.assert_allclose(got["energies"].sum(), ref["energy"], rtol=1e-9)
            np.testing.assert_allclose(got["forces"], ref["forces"], rtol=1e-9, atol=1e-12)
            if atoms.pbc.all():
                voigt = full_3x3_to_voigt_6_stress(ref["stress"])
                np.testing.assert_allclose(got["stress"], voigt, rtol=1e-9, atol=1e-12)
            else:
                assert got["stress"] is None
    assert Package(path).device == torch.device("cpu")


def test_coincident_atoms_are_refused_not_nan(packaged):
    """Two atoms on one spot (or an atom on its own periodic image) have no energy: the
    calculator names them, for the package and for the model, instead of returning NaN."""
    pair = Atoms("CuCu", positions=[[0, 0, 0], [1, 1, 1]])
    pair.positions[1] = pair.positions[0]
    for model in packaged:
        with pytest.raises(ValueError, match="atoms 0 and 1 coincide"):
            MegaGNNCalculator(model).get_potential_energy(pair)
    image = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    image.positions[1] = image.positions[0] + image.cell[0]
    with pytest.raises(ValueError, match="coincide"):
        MegaGNNCalculator(packaged[0]).get_potential_energy(image)


def test_elements_outside_the_training_data_are_refused(packaged):
    """Fe was never seen (the model knows H, C, O, Cu, Au): the calculator refuses it with an
    error that names it, for the model and for its package, unless told to go ahead."""
    model, path = packaged
    iron = bulk("Fe", "bcc", a=2.87) * 2
    iron.numbers[0] = 29
    for source in (model, str(path)):
        with pytest.raises(UnknownElementError, match=r"Fe \(Z=26\)"):
            MegaGNNCalculator(source).get_potential_energy(iron)
        with pytest.raises(UnknownElementError, match="Fe"):
            MegaGNNCalculator(source).predict([structures()["periodic"], iron])
        calc = MegaGNNCalculator(source, allow_unknown_elements=True)
        assert np.isfinite(calc.get_potential_energy(iron))
    assert model.elements() == {1, 6, 8, 29, 79} and Package(path).elements == model.elements()


def test_bad_packages_are_refused(tmp_path, packaged):
    with pytest.raises(FileNotFoundError, match="no inference package"):
        Package(tmp_path / "missing.pt2")
    path = packaged[1]
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PackageError, match=f"{cut}: corrupt or truncated"):
        Package(cut)
    err = io.StringIO()  # megagnn.evaluate says so in one line
    with contextlib.redirect_stderr(err):
        assert evaluate_main(["--run", str(cut), "--no-progress"]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cut}: corrupt"), lines
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_package(packaged[0], tmp_path / "model.bin")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="machine with CUDA"):
            export_package(packaged[0], tmp_path / "model.pt2", device="cuda")


def parse_runner(text: str) -> dict[str, np.ndarray]:
    lines = text.strip().splitlines()
    out = {"energy": float(lines[0].split()[1])}
    rows = [ln for ln in lines[1:] if ln not in ("forces", "stress")]
    split = lines.index("stress") - 2 if "stress" in lines else len(rows)
    out["forces"] = np.array([[float(x) for x in r.split()] for r in rows[:split]])
    if "stress" in lines:
        out["stress"] = np.array([[float(x) for x in r.split()] for r in rows[split:]])
    return out


def test_cpp_runner_matches_python(packaged, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ runner cannot be built")
    model, path = packaged
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    runner = build / "megagnn_infer"
    for name, atoms in structures().items():
        xyz = tmp_path / f"{name}.xyz"
        ase.io.write(xyz, atoms, format="extxyz")
        proc = subprocess.run([str(runner), str(path), str(xyz)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        # compared with the structure as the file holds it (extxyz rounds positions)
        got, ref = parse_runner(proc.stdout), expected(model, ase.io.read(xyz))
        np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-10)
        np.testing.assert_allclose(got["forces"], ref["forces"], rtol=1e-9, atol=1e-11)
        if atoms.pbc.all():
            np.testing.assert_allclose(got["stress"], ref["stress"], rtol=1e-9, atol=1e-11)
        else:
            assert "stress" not in got
    bad = subprocess.run([str(runner), str(path), str(tmp_path / "none.xyz")], capture_output=True)
    assert bad.returncode == 1 and b"cannot open" in bad.stderr
    iron = tmp_path / "iron.xyz"
    ase.io.write(iron, bulk("Fe", "bcc", a=2.87), format="extxyz")
    refused = subprocess.run([str(runner), str(path), str(iron)], capture_output=True)
    assert refused.returncode == 1 and b"Fe (Z=26)" in refused.stderr
    forced = [str(runner), str(path), str(iron), "--allow-unknown-elements"]
    assert subprocess.run(forced, capture_output=True).returncode == 0
    cut = tmp_path / "cut.pt2"  # a truncated package: one line, no C++ stack frames
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    broken = subprocess.run([str(runner), str(cut), str(xyz)], capture_output=True, text=True)
    assert broken.returncode == 1 and str(cut) in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    pair = tmp_path / "pair.xyz"
    ase.io.write(pair, Atoms("CuCu", positions=[[0, 0, 0], [0, 0, 0]]), format="extxyz")
    together = subprocess.run([str(runner), str(path), str(pair)], capture_output=True, text=True)
    assert together.returncode == 1 and "coincide" in together.stderr, together.stderr


@pytest.mark.parametrize(
    "family",
    [pytest.param("schnet", marks=pytest.mark.slow), pytest.param("egnn", marks=pytest.mark.slow),
     "irrep"],
)  # fmt: skip
def test_every_family_exports(tmp_path, family):
    """SchNet, EGNN and IrrepNet compile into packages too (PaiNN: the fixture above; the
    scalar families SchNet and EGNN only with -m slow: each compile takes 40-60 s on 2 cores
    with threaded kernels)."""
    torch.manual_seed(0)
    # IrrepNet with the product, as its named sizes have it, at L = 1: the same code as L = 2
    # (whose physics tests/test_physics.py checks) in a smaller graph to compile
    irrep = dict(correlation=2, lmax=1) if family == "irrep" else {}
    cfg = ModelConfig(family=family, hidden=8, layers=2, num_rbf=8, radial_hidden=8, cutoff=4.0,
                      **irrep)  # fmt: skip
    model = build_model(cfg).double().eval()
    model.set_statistics(0, {29: -3.0, 79: -2.5}, 0.5, 10.0)
    package = Package(export_package(model, tmp_path / f"{family}.pt2"))
    atoms = structures()["periodic"]
    batch = to_device(atoms_to_graph(atoms, 4.0), "cpu", torch.float64)
    energy, forces, stress, _ = package(*graph_inputs(batch))
    ref = expected(model, atoms)
    torch.testing.assert_close(energy.item(), ref["energy"], **TOL, msg=family)
    torch.testing.assert_close(forces.numpy(), ref["forces"], **TOL, msg=family)
    torch.testing.assert_close(stress.numpy(), ref["stress"], **TOL, msg=family)


def test_a_package_build_clears_truncated_kernels_first(tmp_path, monkeypatch):
    """A build killed while linking leaves an empty library in Inductor's cache that every
    later build would load: the export removes it before it compiles."""
    import os
    import time

    stale = tmp_path / "k2" / "ck2w.main.so"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 3600,) * 2)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []

    def compile_and_package(program, package_path, inductor_configs):
        seen.append(stale.exists())
        Path(package_path).write_bytes(b"")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    model = build_model(ModelConfig(family="schnet", hidden=8, layers=1, num_rbf=8, max_z=8))
    export_package(model, tmp_path / "model.pt2")
    assert seen == [False]
