"""model.tensor_product=oeq: the edge product as the e3nn description that OpenEquivariance
takes (``oeq.spec``), run here by e3nn's own TensorProduct, gives the written-out
contraction's numbers through forces, stress and the force-loss backward (a second
derivative), so that on a GPU only the module that runs the description changes
(tests/gpu/test_tensor_products_cuda.py runs OpenEquivariance's kernels)."""

import pytest
import torch
from test_compiled import batch_of, outputs_and_gradients
from test_physics import alloy, make_model, mol

from megagnn import keys as K
from megagnn.models import oeq
from megagnn.models.irrep import IrrepBlock, couple
from megagnn.models.o3 import paths, spherical_harmonics

TOL = dict(rtol=1e-10, atol=1e-12)


def e3nn_product(lmax, channels, dtype, device):
    """e3nn's TensorProduct for ``oeq.spec``: what OpenEquivariance reproduces. Built with
    fp64 defaults, or e3nn keeps its Clebsch-Gordan constants in fp32."""
    from e3nn import o3

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.TensorProduct(**oeq.spec(lmax, channels)).to(device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(default)


@pytest.fixture
def e3nn_runs_the_spec(monkeypatch):
    monkeypatch.setattr(oeq, "product", e3nn_product)


@pytest.mark.parametrize("lmax", [1, 2, 3])
@pytest.mark.parametrize("items", [0, 1, 37])
def test_edge_product_and_its_double_backward_match_the_written_out_contraction(
    lmax, items, e3nn_runs_the_spec
):
    g = torch.Generator().manual_seed(lmax)
    n, c, rows = 6, 5, (lmax + 1) ** 2
    x = torch.randn(n, rows, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(items, len(paths(lmax)), c, generator=g, dtype=torch.float64)
    w.requires_grad_()
    unit = torch.randn(items, 3, generator=g, dtype=torch.float64, requires_grad=True)
    second = spherical_harmonics(lmax, torch.nn.functional.normalize(unit, dim=1))
    index = torch.randint(0, n, (items,), generator=g)  # unsorted, with repeats
    expected = torch.cat(couple(x, w, second, lmax, index), 1)
    got = oeq.couple(x, w, second, lmax, index)
    torch.testing.assert_close(got, expected, **TOL)
    # first derivatives kept in the graph (forces), then differentiated again (the loss)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    results = []
    for out in (got, expected):
        (d_unit,) = torch.autograd.grad((out * probe).sum(), unit, create_graph=True)
        results.append(torch.autograd.grad((d_unit**2).sum(), (x, w), allow_unused=True))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_model_matches_e3nn_on_forces_stress_and_force_loss_gradients(monkeypatch):
    built = []
    monkeypatch.setattr(oeq, "product", lambda *a: built.append(a) or e3nn_product(*a))
    sizes = dict(hidden=8, num_rbf=4, radial_hidden=8)
    reference = make_model("irrep-c2", tensor_product="e3nn", **sizes).train()
    model = make_model("irrep-c2", tensor_product="e3nn", **sizes).train()
    model.load_state_dict(reference.state_dict())
    blocks = [m for m in model.modules() if isinstance(m, IrrepBlock)]
    assert blocks
    for block in blocks:  # as the config would, where OpenEquivariance is installed
        block.tensor_product = "oeq"
    batch = batch_of([alloy(0), mol()])
    ref, ref_grads = outputs_and_gradients(reference, reference, batch)
    out, grads = outputs_and_gradients(model, model, batch)
    assert len(built) == len(blocks)  # each block's edge product ran through the spec
    for key in (K.ENERGY, K.ENERGIES, K.FORCES, K.STRESS):
        torch.testing.assert_close(out[key], ref[key], **TOL)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_layout_round_trip():
    x = torch.randn(4, 9, 3)
    z = oeq.to_mul_ir(x, 2)
    assert torch.equal(z[:, 3:12].view(4, 3, 3), x[:, 1:4].transpose(1, 2))  # 1o as [C, 3]
    assert torch.equal(oeq.from_mul_ir(z, 2, 3), x)


def test_cpu_says_what_to_change():
    x = torch.randn(3, 4, 2)
    with pytest.raises(RuntimeError, match="CUDA only; use model.tensor_product=e3nn"):
        oeq.couple(x, torch.randn(3, len(paths(1)), 2), torch.randn(3, 4), 1)
