"""megagnn inside torch-sim: its own conformance check, the same numbers as the ASE
calculator for every system of a batch, and its batched MD and relaxation."""

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

ts = pytest.importorskip("torch_sim", reason="needs torch-sim-atomistic")

from test_physics import make_model  # noqa: E402

from megagnn.elements import UnknownElementError  # noqa: E402
from megagnn.inference.calculator import MegaGNNCalculator  # noqa: E402
from megagnn.inference.torch_sim import MegaGNNModel  # noqa: E402

CPU = torch.device("cpu")


def si_fe_model(family="painn"):
    """A model whose statistics hold Si and Fe, the elements torch-sim validates with."""
    model = make_model(family)
    model.set_statistics(0, {14: -5.4, 26: -8.3, 29: -3.5, 79: -2.0}, 0.7, 12.0)
    return model


@pytest.mark.parametrize("family", ["painn", "irrep"])
def test_passes_torch_sims_own_validation(family):
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(MegaGNNModel(si_fe_model(family), CPU), CPU, torch.float64)


def test_unknown_elements_are_refused_unless_allowed():
    from torch_sim.models.interface import validate_model_outputs

    model = make_model("painn")  # Cu, Au, H, C, O: no Si or Fe
    with pytest.raises(UnknownElementError, match="Si"):
        validate_model_outputs(MegaGNNModel(model, CPU), CPU, torch.float64)
    expert = MegaGNNModel(model, CPU, allow_unknown_elements=True)
    validate_model_outputs(expert, CPU, torch.float64)


def _systems():
    cu = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    cu.rattle(0.05, seed=1)
    au = bulk("Au", "fcc", a=4.1, cubic=True)
    au.numbers[1] = 29
    au.rattle(0.05, seed=2)
    return [cu, au, cu.copy()]


def test_every_system_of_a_batch_gets_what_the_ase_calculator_gives():
    model = make_model("painn")
    wrapped = MegaGNNModel(model, CPU)
    out = wrapped(ts.io.atoms_to_state(_systems(), CPU, torch.float64))
    calc = MegaGNNCalculator(model)
    start = 0
    for k, atoms in enumerate(_systems()):
        atoms.calc = calc
        n = len(atoms)
        assert float(out["energy"][k]) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(out["forces"][start : start + n], atoms.get_forces(), atol=1e-10)
        voigt = out["stress"][k][[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        np.testing.assert_allclose(voigt, atoms.get_stress(), atol=1e-10)
        start += n


def test_molecules_and_an_energy_only_model():
    model = make_model("painn")
    state = ts.io.atoms_to_state([molecule("H2O"), molecule("CH4")], CPU, torch.float64)
    out = MegaGNNModel(model, CPU)(state)
    assert out["energy"].shape == (2,) and out["forces"].shape == (8, 3)
    energy_only = make_model("painn", forces="none")
    wrapped = MegaGNNModel(energy_only, CPU)
    assert not wrapped.compute_forces and not wrapped.compute_stress
    assert set(wrapped(state)) == {"energy"}


def test_batched_md_and_relaxation_run_through_torch_sim():
    wrapped = MegaGNNModel(make_model("painn"), CPU)
    state = ts.io.atoms_to_state(_systems(), CPU, torch.float64)
    final = ts.integrate(
        system=state,
        model=wrapped,
        integrator=ts.nvt_langevin,
        n_steps=5,
        timestep=0.001,
        temperature=300,
    )
    assert final.positions.shape == state.positions.shape
    assert torch.isfinite(final.positions).all()
    start = wrapped(state)["energy"]
    relaxed = ts.optimize(system=state, model=wrapped, optimizer=ts.unit_cell_fire, max_steps=20)
    assert (wrapped(relaxed)["energy"] < start).all()
