"""What only a GPU can check: kernels compiled for the device at realistic sizes (many
programs in flight: races, atomics in bf16-input paths), and the model with kernels on."""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from megagnn.kernels import (  # noqa: E402
    cfconv,
    cfconv_reference,
    painn_message,
    painn_message_reference,
    radial_basis,
    radial_basis_reference,
    segment_sum,
    segment_sum_reference,
)

DEVICE = "cuda"
EDGES, NODES = 200_000, 5_000


def _close(a, b, rtol):
    """Scaled to the largest value: sums over hundreds of terms round relative to it."""
    scale = b.detach().float().abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_sorted", [True, False])
def test_segment_sum_large(dtype, is_sorted):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    src = torch.randn(EDGES, 384, device=DEVICE, generator=g).to(dtype)
    index = torch.randint(0, NODES, (EDGES,), device=DEVICE, generator=g)
    if is_sorted:
        index = index.sort().values
    out = segment_sum(src, index, NODES, is_sorted=is_sorted)
    ref = segment_sum_reference(src, index, NODES)
    _close(out, ref, 1e-4 if dtype == torch.float32 else 2e-2)
    if is_sorted:  # the CSR path is deterministic
        assert torch.equal(segment_sum(src, index, NODES, is_sorted=True), out)


@pytest.mark.parametrize("kind", [0, 1], ids=["bessel", "gaussian"])
def test_radial_basis_large(kind):
    k, cutoff = 16, 5.0
    if kind == 0:
        params, coeff = torch.arange(1, k + 1, device=DEVICE) * math.pi / cutoff, 0.0
    else:
        params, coeff = torch.linspace(0, cutoff, k, device=DEVICE), -0.5 / (cutoff / k) ** 2
    vec = (0.5 + 2 * torch.rand(EDGES * 5, 3, device=DEVICE)).requires_grad_()
    results = []
    for fn in (radial_basis_reference, radial_basis):
        rbf, env = fn(vec, params, kind, cutoff, 6, coeff)
        (grad,) = torch.autograd.grad((rbf.square().sum() + env.sum()), vec)
        results.append((rbf, env, grad))
    for a, b in zip(*results, strict=True):
        _close(a, b, 1e-5)


def _graph(h_out):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    receiver = torch.randint(0, NODES, (EDGES,), device=DEVICE, generator=g).sort().values
    sender = torch.randint(0, NODES, (EDGES,), device=DEVICE, generator=g)
    weights = [
        torch.randn(64, 16, device=DEVICE, generator=g) / 4,
        torch.randn(64, device=DEVICE, generator=g),
        torch.randn(h_out, 64, device=DEVICE, generator=g) / 8,
        torch.randn(h_out, device=DEVICE, generator=g),
    ]
    rbf = torch.rand(EDGES, 16, device=DEVICE, generator=g)
    env = torch.rand(EDGES, device=DEVICE, generator=g)
    return torch.stack([sender, receiver]), rbf, env, [w.requires_grad_() for w in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["cfconv", "painn"])
def test_fused_message_large(op, dtype):
    """Forward and first-order gradients against the reference; node features in ``dtype``
    (bf16 as under autocast), filter weights and geometry in fp32."""
    h = 256
    index, rbf, env, weights = _graph(3 * h if op == "painn" else h)
    x = torch.randn(NODES, 3 * h if op == "painn" else h, device=DEVICE).to(dtype)
    if op == "cfconv":
        args, fns = (x, rbf, env, index, NODES), (cfconv_reference, cfconv)
    else:
        v = torch.randn(NODES, 3, h, device=DEVICE).to(dtype)
        unit = torch.nn.functional.normalize(torch.randn(EDGES, 3, device=DEVICE), dim=-1)
        args, fns = (x, v, rbf, env, unit, index, NODES), (painn_message_reference, painn_message)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    results = []
    for fn in fns:
        inputs = [t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
                  else t for t in args]  # fmt: skip
        out = fn(*inputs, *weights)
        outs = out if isinstance(out, tuple) else (out,)
        leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad] + weights
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), leaves)
        results.append([*outs, *grads])
    for a, b in zip(*results, strict=True):
        _close(a, b, rtol)
    again = fns[1](*args, *weights)  # one program per (node, channel block): deterministic
    for a, b in zip(again if isinstance(again, tuple) else (again,), results[1], strict=False):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_model_with_kernels_on_gpu(family):
    """A 1.3k-atom cell: energies, forces and the force-loss gradients with kernels on and
    off agree in fp32; a bf16 autocast step with kernels gives finite gradients."""
    from megagnn import keys as K
    from megagnn import ops
    from megagnn.config import ModelConfig
    from megagnn.data import to_device
    from megagnn.models import build_model
    from megagnn.profiling import fixed_batch

    batch = to_device(fixed_batch(1300, 5.0), DEVICE, torch.float32)
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, hidden=128, layers=3, cutoff=5.0)
    model = build_model(cfg).to(DEVICE).train()
    results = []
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            out = model(batch)
            model.zero_grad()
            (out[K.ENERGY].sum() + out[K.FORCES].square().sum()).backward()
        results.append([out[K.ENERGY], out[K.FORCES], *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        _close(a.detach(), b.detach(), 1e-3)
    with ops.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
        model.zero_grad()
        (out[K.ENERGY].sum() + out[K.FORCES].square().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
