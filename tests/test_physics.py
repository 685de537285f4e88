"""Physics every model must satisfy: FD forces and stress, invariances, batching, PBC images."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from scipy.spatial.transform import Rotation

from megagnn import keys as K
from megagnn.config import ModelConfig
from megagnn.data import atoms_to_graph, collate, structure_to_graph, to_device
from megagnn.models import build_model

CUTOFF = 4.0
# irrep-c2: IrrepNet with the second-order product of its neighbour sums (model.correlation)
FAMILIES = ["schnet", "painn", "egnn", "irrep", "irrep-c2"]


def make_model(family, forces="conservative", seed=0, **sizes):
    """``sizes``: other model settings (hidden=8, ...)."""
    torch.manual_seed(seed)
    family, _, variant = family.partition("-")
    cfg = ModelConfig(
        family=family,
        correlation=2 if variant == "c2" else 1,
        cutoff=CUTOFF,
        forces=forces,
        stress=forces == "conservative",
        **{"hidden": 16, "layers": 2, "num_rbf": 8, **sizes},
    )
    model = build_model(cfg).double().eval()
    # non-trivial statistics so they are exercised too
    model.set_statistics(0, {29: -3.5, 79: -2.0, 1: -13.0, 8: -430.0, 6: -1000.0}, 0.7, 12.0)
    return model


def predict(model, atoms):
    return model(to_device(atoms_to_graph(atoms, CUTOFF), "cpu", torch.float64))


def alloy(seed=0, rattle=0.15):
    atoms = bulk("Cu", "fcc", a=3.7) * (2, 2, 2)  # triclinic primitive cell
    atoms.numbers[::3] = 79
    atoms.rattle(rattle, seed=seed)
    return atoms


def slab():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
    atoms.center(vacuum=4.0, axis=2)
    atoms.pbc = [True, True, False]
    atoms.rattle(0.1, seed=3)
    return atoms


def mol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=2)
    return atoms


STRUCTURES = {"bulk": alloy, "slab": slab, "molecule": mol}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_forces_match_finite_differences(family, name):
    model = make_model(family)
    atoms = STRUCTURES[name]()
    forces = predict(model, atoms)[K.FORCES].detach().numpy()
    h = 1e-5
    rng = np.random.default_rng(0)
    for a in rng.choice(len(atoms), size=3, replace=False):
        for d in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, d] += h
            minus.positions[a, d] -= h
            fd = -(predict(model, plus)[K.ENERGY] - predict(model, minus)[K.ENERGY]).item() / (
                2 * h
            )
            assert forces[a, d] == pytest.approx(fd, abs=1e-7, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_stress_matches_strain_derivative(family):
    model = make_model(family)
    atoms = alloy()
    stress = predict(model, atoms)[K.STRESS][0].detach().numpy()
    h, cell, vol = 1e-6, atoms.get_cell()[:], atoms.get_volume()
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = h / 2 if i != j else h
            energies = []
            for sign in (1, -1):
                strained = atoms.copy()
                strained.set_cell(cell @ (np.eye(3) + sign * eps), scale_atoms=True)
                energies.append(predict(model, strained)[K.ENERGY].item())
            fd = (energies[0] - energies[1]) / (2 * h * vol)
            assert stress[i, j] == pytest.approx(fd, abs=1e-8, rel=1e-5)


def test_stress_is_zero_for_non_periodic():
    model = make_model("painn")
    assert torch.all(predict(model, slab())[K.STRESS] == 0)
    assert torch.all(predict(model, mol())[K.STRESS] == 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_rotation_translation_invariance(family, forces):
    model = make_model(family, forces)
    rot = Rotation.random(random_state=7).as_matrix()
    for atoms in (alloy(), mol()):
        ref = predict(model, atoms)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.2, 2.5])
        moved.set_cell(atoms.get_cell()[:] @ rot.T)
        out = predict(model, moved)
        torch.testing.assert_close(out[K.ENERGY], ref[K.ENERGY], rtol=1e-10, atol=1e-10)
        rotated = ref[K.FORCES] @ torch.as_tensor(rot.T)
        torch.testing.assert_close(out[K.FORCES], rotated, rtol=1e-8, atol=1e-10)
        if forces == "conservative" and atoms.pbc.all():
            r = torch.as_tensor(rot)
            torch.testing.assert_close(
                out[K.STRESS][0], r @ ref[K.STRESS][0] @ r.T, rtol=1e-8, atol=1e-12
            )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_permutation_equivariance(family, forces):
    model = make_model(family, forces)
    atoms = alloy()
    perm = np.random.default_rng(1).permutation(len(atoms))
    ref, out = predict(model, atoms), predict(model, atoms[perm])
    torch.testing.assert_close(out[K.ENERGY], ref[K.ENERGY], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out[K.FORCES], ref[K.FORCES][perm], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_supercell_energy_per_atom(family):
    model = make_model(family)
    atoms = alloy(rattle=0.1)
    big = atoms * (2, 2, 2)
    e1 = predict(model, atoms)[K.ENERGY].item() / len(atoms)
    out = predict(model, big)
    assert out[K.ENERGY].item() / len(big) == pytest.approx(e1, rel=1e-10, abs=1e-10)
    f1 = predict(model, atoms)[K.FORCES]
    torch.testing.assert_close(out[K.FORCES][: len(atoms)], f1, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        out[K.STRESS], predict(model, atoms)[K.STRESS], rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_batch_equals_singles(family, forces):
    model = make_model(family, forces)
    structures = [alloy(0), mol(), slab(), alloy(5), Atoms("Cu", positions=[[0, 0, 0]])]
    graphs = [
        structure_to_graph(
            {
                "atomic_numbers": a.numbers,
                "positions": a.positions,
                "cell": a.cell[:],
                "pbc": a.pbc,
            },
            CUTOFF,
        )
        for a in structures
    ]
    batched = model(to_device(collate(graphs), "cpu", torch.float64))
    start = 0
    for k, a in enumerate(structures):
        single = predict(model, a)
        torch.testing.assert_close(
            batched[K.ENERGY][k], single[K.ENERGY][0], rtol=1e-12, atol=1e-10
        )
        torch.testing.assert_close(
            batched[K.FORCES][start : start + len(a)], single[K.FORCES], rtol=1e-10, atol=1e-12
        )
        start += len(a)


@pytest.mark.parametrize("family", FAMILIES)
def test_isolated_atom_energy_is_reference(family):
    """An atom with no neighbours gets its element's reference energy plus the scaled readout
    of its own embedding (no message reaches it), and no force; atoms out of each other's
    reach add up."""
    model = make_model(family)
    batch = to_device(atoms_to_graph(Atoms("Au"), CUTOFF), "cpu", torch.float64)
    out = model(batch)
    assert torch.all(out[K.FORCES] == 0)
    with torch.no_grad():
        edges, _ = model.edges(batch, batch[K.POSITIONS], batch[K.CELL])
        state = model.run_blocks(model.backbone.blocks, model.embed(batch[K.ATOMIC_NUMBERS]), edges)
        y = model.energy_head(model.backbone.scalars(state), batch[K.HEAD]).item()
    # E_ref(Au) = -2.0 and scale 0.7, as make_model sets them
    assert out[K.ENERGY].item() == pytest.approx(-2.0 + 0.7 * y, rel=1e-12, abs=1e-12)
    pair = predict(model, Atoms("AuCu", positions=[[0, 0, 0], [CUTOFF + 0.5, 0, 0]]))
    alone = predict(model, Atoms("Cu"))[K.ENERGY] + out[K.ENERGY]
    assert pair[K.ENERGY].item() == pytest.approx(alone.item(), rel=1e-12, abs=1e-12)
    # with a zero readout the energy of any isolated atoms is exactly their references
    with torch.no_grad():
        for p in model.energy_head.mlps[0][-1].parameters():
            p.zero_()
    assert predict(model, Atoms("AuCu", positions=[[0, 0, 0], [9, 0, 0]]))[K.ENERGY].item() == (
        -2.0 - 3.5
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_smooth_at_cutoff(family):
    """An atom crossing the cutoff changes energy and forces continuously: both go to the
    isolated atoms' values (forces to zero), so MD sees no kick at the cutoff."""
    model = make_model(family)
    energies, forces = [], []
    for d in (CUTOFF - 1e-4, CUTOFF - 1e-6, CUTOFF + 1e-6):
        atoms = Atoms("CuCu", positions=[[0, 0, 0], [d, 0, 0]])
        out = predict(model, atoms)
        energies.append(out[K.ENERGY].item())
        forces.append(out[K.FORCES].detach().abs().max().item())
    assert energies[1] == pytest.approx(energies[2], abs=1e-9)
    assert forces[2] == 0
    # the force vanishes continuously: tiny just inside, smaller the closer to the cutoff
    assert forces[1] < 1e-9 and forces[1] < forces[0]


@pytest.mark.parametrize("family", ["irrep", "irrep-c2"])
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_irrep_features_transform_by_wigner_matrices(reflect, family):
    """IrrepNet's node features of every degree l <= 2 transform by the Wigner matrix
    D^l(R) of the rotation (and by (-1)^l D^l under a reflection: natural parity)."""
    from e3nn import o3

    model = make_model(family)
    atoms = alloy()
    rot = torch.as_tensor(Rotation.random(random_state=11).as_matrix())
    sign = -1.0 if reflect else 1.0

    def features(a):
        batch = to_device(atoms_to_graph(a, CUTOFF), "cpu", torch.float64)
        edges, _ = model.edges(batch, batch[K.POSITIONS], batch[K.CELL])
        state = model.run_blocks(model.backbone.blocks, model.embed(batch[K.ATOMIC_NUMBERS]), edges)
        return state[0].detach()  # [N, 9, C]

    moved = atoms.copy()
    moved.positions = sign * atoms.positions @ rot.numpy().T
    moved.set_cell(sign * atoms.get_cell()[:] @ rot.numpy().T)
    x, y = features(atoms), features(moved)
    points = torch.randn(64, 3, dtype=torch.float64)
    for l in range(3):
        # D^l(R) from the harmonics themselves, Y(R r) = D Y(r), by least squares (exact to
        # round-off; e3nn's D_from_matrix goes through Euler angles and loses ~1e-7 here)
        before = o3.spherical_harmonics(l, points, True, normalization="component")
        after = o3.spherical_harmonics(l, points @ rot.T, True, normalization="component")
        d = torch.linalg.lstsq(before, after).solution.T  # [2l+1, 2l+1]
        expected = torch.einsum("ab,nbc->nac", d, x[:, l * l : (l + 1) ** 2])
        expected = expected * (sign**l)
        torch.testing.assert_close(y[:, l * l : (l + 1) ** 2], expected, rtol=1e-8, atol=1e-12)
        assert x[:, l * l : (l + 1) ** 2].abs().max() > 1e-3  # the degree is populated
