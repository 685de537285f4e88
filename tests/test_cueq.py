"""model.tensor_product=cueq: cuequivariance-torch running IrrepNet's tensor products gives
the numbers of the written-out contraction, through forces, stress and the force-loss
backward (a second derivative), and in the trace that compiled training and packages use.
On CPU it runs cuequivariance's plain-PyTorch method; tests/gpu runs its CUDA kernel."""

import pytest
import torch
from test_compiled import batch_of, force_loss, outputs_and_gradients
from test_physics import CUTOFF, alloy, make_model, mol

from megagnn import keys as K
from megagnn.data import atoms_to_graph, to_device
from megagnn.inference.package import export_program, graph_inputs
from megagnn.models import cueq
from megagnn.models.compiled import INPUTS, trace
from megagnn.models.irrep import couple
from megagnn.models.o3 import paths, spherical_harmonics

pytest.importorskip("cuequivariance_torch")

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lmax", [1, 2, 3])
@pytest.mark.parametrize("per_channel", [False, True], ids=["harmonics", "per-channel"])
@pytest.mark.parametrize("items", [0, 1, 37])
def test_products_and_their_gradients_match_the_written_out_contraction(lmax, per_channel, items):
    g = torch.Generator().manual_seed(lmax)
    n, c, rows = 6, 5, (lmax + 1) ** 2

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    w = rand(items, len(paths(lmax)), c)
    if per_channel:  # A ⊗ A: the items' own features, channel by channel
        x, second, index = rand(items, rows, c), rand(items, rows, c), None
    else:  # messages: features gathered from senders, coupled to the edges' harmonics
        x = rand(n, rows, c)
        unit = torch.nn.functional.normalize(torch.randn(items, 3, generator=g), dim=1)
        second = spherical_harmonics(lmax, unit.double()).requires_grad_()
        index = torch.randint(0, n, (items,), generator=g)  # unsorted, with repeats
    expected = torch.cat(couple(x, w, second, lmax, index), 1)
    got = cueq.couple(x, w, second, lmax, index)
    torch.testing.assert_close(got, expected, **TOL)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    wrt = (x, w, second)
    want = torch.autograd.grad((expected * probe).sum(), wrt, allow_unused=True)
    have = torch.autograd.grad((got * probe).sum(), wrt, allow_unused=True)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def pair(lmax=2):
    """IrrepNet with the second-order product, run by each implementation, same weights."""
    sizes = dict(hidden=8, num_rbf=4, radial_hidden=8, lmax=lmax)
    reference = make_model("irrep-c2", tensor_product="e3nn", **sizes).train()
    model = make_model("irrep-c2", tensor_product="cueq", **sizes).train()
    model.load_state_dict(reference.state_dict())
    return reference, model


def test_model_matches_e3nn_on_forces_stress_and_force_loss_gradients():
    reference, model = pair()
    batch = batch_of([alloy(0), mol()])
    ref, ref_grads = outputs_and_gradients(reference, reference, batch)
    out, grads = outputs_and_gradients(model, model, batch)
    for key in (K.ENERGY, K.ENERGIES, K.FORCES, K.STRESS):
        torch.testing.assert_close(out[key], ref[key], **TOL)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_forces_are_minus_the_energy_gradient_by_finite_differences():
    _, model = pair()
    batch = batch_of([alloy(1)])
    forces = model(batch)[K.FORCES].detach()
    step = torch.randn(batch[K.POSITIONS].shape, generator=torch.Generator().manual_seed(0))
    step = step.double() / step.norm()
    h, energies = 1e-4, []
    for sign in (1, -1):
        moved = dict(batch, **{K.POSITIONS: batch[K.POSITIONS] + sign * h * step})
        energies.append(model(moved)[K.ENERGY].sum().item())
    slope = (energies[0] - energies[1]) / (2 * h)
    assert abs(slope + (forces * step).sum().item()) < 1e-7


def test_traced_graph_matches_the_eager_reference():
    """The graph that train.compile compiles, traced through cueq (at L = 1: the same code
    in fewer paths, for a shorter trace)."""
    reference, model = pair(lmax=1)
    batch = batch_of([alloy(2), mol()])
    graph = trace(model, batch, forces=True, stress=True)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    model.zero_grad()
    energy, forces, stress, _ = graph(*[state[n] for n in names], *[batch[k] for k in INPUTS])
    force_loss({K.ENERGY: energy, K.FORCES: forces, K.STRESS: stress}).backward()
    ref, ref_grads = outputs_and_gradients(reference, reference, batch)
    torch.testing.assert_close(forces, ref[K.FORCES], **TOL)
    torch.testing.assert_close(stress, ref[K.STRESS], **TOL)
    for p, r in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


def test_package_graph_matches_the_eager_reference():
    """The package's trace (fake tensors: the products' coefficients must exist before it)."""
    reference, model = pair(lmax=1)
    program = export_program(model.eval())
    atoms = alloy(3)
    batch = to_device(atoms_to_graph(atoms, CUTOFF), "cpu", torch.float64)
    energy, forces, stress, _ = program.module()(*graph_inputs(batch))
    ref = reference.eval()(batch)
    torch.testing.assert_close(energy, ref[K.ENERGY][0], **TOL)
    torch.testing.assert_close(forces, ref[K.FORCES], **TOL)
    torch.testing.assert_close(stress, ref[K.STRESS][0], **TOL)
