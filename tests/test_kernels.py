"""Triton kernels against their PyTorch references (on CPU through TRITON_INTERPRET=1).

What the interpreter cannot check: races between programs (it runs them one by one),
compilation for a real device, speed, and 16-bit ``tl.dot`` (silently wrong there, so the
kernels upcast to fp32 before every ``tl.dot``; 16-bit atomics raise there, so the
unsorted aggregation adds in fp32). bf16 inputs are checked on both aggregation paths and
as the node features of the fused ops. Races, compilation and speed: tests/gpu and
benchmarks/kernels.py on a GPU.
"""

import math
from contextlib import nullcontext

import pytest
import torch

pytest.importorskip("triton")

from megagnn.kernels import (  # noqa: E402
    radial_basis,
    radial_basis_reference,
    segment_sum,
    segment_sum_reference,
)

from megagnn import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (edges, trailing shape, nodes): no edges, one atom, isolated atoms (nodes beyond the
# largest index), H not a power of two or a block multiple, vector channels [3, H]
SHAPES = [(0, (4,), 3), (1, (1,), 1), (5, (7,), 9), (200, (130,), 17), (64, (3, 5), 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("edges, trailing, nodes", SHAPES)
def test_segment_sum_matches_reference(dtype, order, edges, trailing, nodes):
    g = torch.Generator().manual_seed(edges)
    src = torch.randn(edges, *trailing, generator=g, dtype=dtype).to(DEVICE)
    index = torch.randint(0, max(nodes - 2, 1), (edges,), generator=g).to(DEVICE)  # repeats
    if order == "sorted":
        index = index.sort().values
    out = segment_sum(src, index, nodes, is_sorted=order == "sorted")
    torch.testing.assert_close(out, segment_sum_reference(src, index, nodes), **TOL[dtype])
    # the order check picks the same path by itself
    torch.testing.assert_close(segment_sum(src, index, nodes), out, **TOL[dtype])


@pytest.mark.parametrize("is_sorted", [True, False])
def test_segment_sum_bf16_accumulates_in_fp32(is_sorted):
    src = torch.full((300, 4), 0.01, dtype=torch.bfloat16, device=DEVICE)
    index = torch.zeros(300, dtype=torch.long, device=DEVICE)
    out = segment_sum(src, index, 2, is_sorted=is_sorted)
    ref = segment_sum_reference(src, index, 2)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=0)
    assert abs(out[0, 0].item() - 3.0) < 0.02  # bf16 running sums would stall near 2


@pytest.mark.parametrize("is_sorted", [True, False])
def test_segment_sum_gradients(is_sorted):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(12, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    index = torch.randint(0, 5, (12,), generator=g).to(DEVICE)
    if is_sorted:
        index = index.sort().values

    def f(x):
        return segment_sum(x, index, 6, is_sorted=is_sorted) ** 2  # non-linear: 2nd order

    assert torch.autograd.gradcheck(f, (src,))
    assert torch.autograd.gradgradcheck(f, (src,))


def _basis(kind, k, cutoff):
    if kind == 0:
        return torch.arange(1, k + 1) * math.pi / cutoff, 0.0
    return torch.linspace(0.0, cutoff, k), -0.5 / (cutoff / (k - 1)) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [0, 1], ids=["bessel", "gaussian"])
@pytest.mark.parametrize("edges, k", [(0, 8), (1, 5), (97, 16)])
def test_radial_basis_matches_reference(dtype, kind, edges, k):
    cutoff = 4.0
    params, coeff = _basis(kind, k, cutoff)
    g = torch.Generator().manual_seed(edges)
    # lengths from 0.5 Å to past the cutoff (the envelope must be exactly zero there)
    vec = torch.randn(edges, 3, generator=g, dtype=dtype)
    vec = (
        vec / vec.norm(dim=-1, keepdim=True) * torch.linspace(0.5, 5.0, edges, dtype=dtype)[:, None]
    )
    vec = vec.to(DEVICE)
    out = radial_basis(vec, params.to(DEVICE), kind, cutoff, 6, coeff)
    ref = radial_basis_reference(vec, params.to(DEVICE), kind, cutoff, 6, coeff)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("kind", [0, 1], ids=["bessel", "gaussian"])
def test_radial_basis_first_and_second_derivatives(kind):
    params, coeff = _basis(kind, 6, 4.0)
    g = torch.Generator().manual_seed(3)
    vec = (1.5 * torch.randn(9, 3, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()

    def f(v):
        return radial_basis(v, params.to(DEVICE), kind, 4.0, 5, coeff)

    assert torch.autograd.gradcheck(f, (vec,))
    assert torch.autograd.gradgradcheck(f, (vec,))


@pytest.mark.parametrize(
    "family, recompute, shuffled",
    [("schnet", False, False), ("painn", False, False), ("schnet", True, False),
     ("painn", True, False), ("schnet", False, True), ("painn", False, True)],
    ids=["schnet", "painn", "schnet-recompute", "painn-recompute", "schnet-shuffled",
         "painn-shuffled"],
)  # fmt: skip
def test_model_with_kernels_equals_model_without(family, recompute, shuffled):
    """Energies, forces and stress, and the force-loss gradients, with kernels on and off
    (and under activation recomputation, whose saved-tensor hooks the backward must bear;
    and with the kernels' batch in another edge order, which the model must put right)."""
    from ase.build import bulk

    from megagnn import keys as K
    from megagnn.config import ModelConfig
    from megagnn.data import atoms_to_graph, collate, to_device
    from megagnn.models import build_model

    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    atoms.rattle(0.1, seed=0)
    batch = to_device(collate([atoms_to_graph(atoms, 3.5)]), DEVICE, torch.float64)
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, hidden=8, layers=2, num_rbf=6, radial_hidden=8, cutoff=3.5)
    model = build_model(cfg).to(DEVICE, torch.float64).train()
    model.recompute_activations = recompute
    results = []
    order = torch.randperm(batch[K.EDGE_INDEX].shape[1], generator=torch.Generator().manual_seed(0))
    shuffled_batch = dict(batch)
    shuffled_batch[K.EDGE_INDEX] = batch[K.EDGE_INDEX][:, order]
    shuffled_batch[K.CELL_SHIFTS] = batch[K.CELL_SHIFTS][order]
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            out = model(shuffled_batch if shuffled and backend == "triton" else batch)
            model.zero_grad()
            (out[K.ENERGY].sum() + (out[K.FORCES] ** 2).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (out_t, grads_t), (out_k, grads_k) = results
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        torch.testing.assert_close(out_k[key], out_t[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_k, grads_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _cfconv_inputs(nodes, edges, h, k, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    receiver = torch.randint(0, max(nodes - 1, 1), (edges,), generator=g).sort().values
    sender = torch.randint(0, nodes, (edges,), generator=g)
    index = torch.stack([sender, receiver]).to(DEVICE)
    env = torch.rand(edges, generator=g, dtype=dtype).to(DEVICE)
    return rand(nodes, h), rand(edges, k), env, index, rand(r, k), rand(r), rand(h, r), rand(h)


def _assert_matches(fused, reference, args, inputs, dtype):
    """Outputs and the gradients of every input (a random projection of the outputs) of the
    fused op against its reference. Sums of many O(10) terms round relative to the largest
    value, so the absolute tolerance scales with it."""
    for t in inputs:
        t.requires_grad_()
    g = torch.Generator().manual_seed(1)
    results = []
    for fn in (reference, fused):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        probes = [torch.randn(o.shape, generator=g, dtype=dtype).to(DEVICE) for o in outs]
        total = sum((o * p).sum() for o, p in zip(outs, probes, strict=True))
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        grads = [
            torch.zeros_like(t) if d is None else d for d, t in zip(grads, inputs, strict=True)
        ]
        results.append([*outs, *grads])
        g.manual_seed(1)  # the same probes for both
    for a, b in zip(*results, strict=True):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        tol = TOL[dtype]
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [0, 1], ids=["ssp", "silu"])
@pytest.mark.parametrize(
    "nodes, edges, h, k, r",
    [(3, 0, 4, 8, 8), (1, 1, 1, 1, 1), (9, 60, 7, 6, 9), (20, 300, 70, 16, 33)],
)
def test_cfconv_matches_reference(dtype, act, nodes, edges, h, k, r):
    from megagnn.kernels import cfconv, cfconv_reference

    x, rbf, env, index, *weights = _cfconv_inputs(nodes, edges, h, k, r, dtype)
    args = (x, rbf, env, index, nodes, *weights, act)
    _assert_matches(cfconv, cfconv_reference, args, [x, rbf, env, *weights], dtype)


def test_cfconv_first_and_second_derivatives():
    from megagnn.kernels import cfconv

    x, rbf, env, index, *weights = _cfconv_inputs(3, 5, 2, 2, 3, torch.float64)
    inputs = [t.requires_grad_() for t in (x, rbf, env, *weights)]

    def f(x, rbf, env, w1, b1, w2, b2):
        return cfconv(x, rbf, env, index, 3, w1, b1, w2, b2) ** 2

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_cfconv_layers_sharing_their_geometry():
    """Two layers fed by the same basis and envelope, as in a model: the derivative of the
    output with respect to the edge lengths, and its own derivative, equal the reference's
    (backward must differentiate each layer alone, not again through its inputs' history)."""
    from megagnn.kernels import cfconv, cfconv_reference

    x, rbf, env, index, *weights = _cfconv_inputs(5, 30, 6, 4, 8, torch.float64)
    lengths = (rbf[:, 0].abs() + 0.5).requires_grad_()
    results = []
    for fn in (cfconv_reference, cfconv):
        basis = torch.stack([torch.sin(k * lengths) for k in range(1, 5)], dim=-1)
        envelope = torch.exp(-lengths)
        h = fn(fn(x, basis, envelope, index, 5, *weights), basis, envelope, index, 5, *weights)
        (g,) = torch.autograd.grad(h.square().sum(), [lengths], create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), [lengths])
        results.append((g.detach(), gg))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def _painn_inputs(nodes, edges, h, k, r, dtype, seed=0):
    """(phi [N, 3H], v [N, 3, H], rbf, env, unit, index, w1, b1, w2 [3H, R], b2)."""
    g = torch.Generator().manual_seed(seed)
    x, rbf, env, index, w1, b1, w2, b2 = _cfconv_inputs(nodes, edges, 3 * h, k, r, dtype, seed)
    v = torch.randn(nodes, 3, h, generator=g, dtype=dtype).to(DEVICE)
    unit = torch.nn.functional.normalize(torch.randn(edges, 3, generator=g, dtype=dtype), dim=-1)
    return x, v, rbf, env, unit.to(DEVICE), index, w1, b1, w2, b2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [0, 1], ids=["ssp", "silu"])
@pytest.mark.parametrize(
    "nodes, edges, h, k, r",
    [(3, 0, 4, 8, 8), (1, 1, 1, 1, 1), (9, 60, 7, 6, 9), (20, 300, 40, 16, 33)],
)
def test_painn_message_matches_reference(dtype, act, nodes, edges, h, k, r):
    from megagnn.kernels import painn_message, painn_message_reference

    phi, v, rbf, env, unit, index, *weights = _painn_inputs(nodes, edges, h, k, r, dtype)
    args = (phi, v, rbf, env, unit, index, nodes, *weights, act)
    inputs = [phi, v, rbf, env, unit, *weights]
    _assert_matches(painn_message, painn_message_reference, args, inputs, dtype)


def test_painn_message_first_and_second_derivatives():
    from megagnn.kernels import painn_message

    phi, v, rbf, env, unit, index, *weights = _painn_inputs(3, 5, 2, 2, 3, torch.float64)
    inputs = [t.requires_grad_() for t in (phi, v, rbf, env, unit, *weights)]

    def f(phi, v, rbf, env, unit, *weights):
        ds, dv = painn_message(phi, v, rbf, env, unit, index, 3, *weights)
        return ds**2, dv**2

    # fast mode (random projections of the Jacobian): the interpreter is slow per call
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_painn_message_refuses_mismatched_channels():
    from megagnn.kernels import painn_message

    phi, v, rbf, env, unit, index, *weights = _painn_inputs(3, 5, 2, 2, 3, torch.float64)
    with pytest.raises(ValueError, match=r"\[N, 3H\], \[N, 3, H\]"):
        painn_message(phi[:, :5], v, rbf, env, unit, index, 3, *weights)


def _fused_ops(dtype=torch.float32, nodes=40, edges=1000, h=32):
    """(name, fused, reference, inputs that get gradients, all arguments) per fused op."""
    from megagnn.kernels import cfconv, cfconv_reference, painn_message, painn_message_reference

    x, rbf, env, index, *weights = _cfconv_inputs(nodes, edges, h, 8, 16, dtype)
    phi, v, rbf_p, env_p, unit, index_p, *weights_p = _painn_inputs(nodes, edges, h, 8, 16, dtype)
    return [
        ("cfconv", cfconv, cfconv_reference, [x, *weights],
         (x, rbf, env, index, nodes, *weights)),
        ("painn", painn_message, painn_message_reference, [phi, v, *weights_p],
         (phi, v, rbf_p, env_p, unit, index_p, nodes, *weights_p)),
    ]  # fmt: skip


def _total(out) -> torch.Tensor:
    return sum(t.float().sum() for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("op", range(2), ids=["cfconv", "painn"])
def test_fused_ops_keep_no_per_edge_tensor(op):
    """What forward leaves for backward: the unfused op keeps several [E, H] tensors, the
    fused one only its inputs (>= 4x less is the goal; backward recomputes one layer's
    [E, H] tensors transiently)."""
    from megagnn.profiling import count_saved_activations

    name, fused, reference, leaves, args = _fused_ops()[op]
    for t in leaves:
        t.requires_grad_()
    saved = []
    for fn in (reference, fused):
        with count_saved_activations(torch.nn.Linear(1, 1)) as count:
            out = _total(fn(*args))
        saved.append(count["bytes"])
        out.backward()
    assert saved[1] * 4 <= saved[0], (name, saved)


@pytest.mark.parametrize("op", range(2), ids=["cfconv", "painn"])
def test_fused_ops_with_bf16_features(op):
    """Under bf16 autocast the node features arrive in bf16 while the basis and the filter
    weights stay fp32: forward and backward run and match the reference (fp32 inside)."""
    name, fused, reference, _, args = _fused_ops(nodes=12, edges=150, h=24)[op]
    n_features = 2 if name == "painn" else 1  # phi (and v) are node features
    args = [t.bfloat16() if i < n_features else t for i, t in enumerate(args)]
    results = []
    for fn in (reference, fused):
        inputs = [t.detach() if torch.is_tensor(t) else t for t in args]
        leaves = [
            t.requires_grad_() for t in inputs if torch.is_tensor(t) and t.is_floating_point()
        ]
        out = fn(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        assert all(t.dtype == torch.bfloat16 for t in outs)
        grads = torch.autograd.grad(_total(out), leaves)
        assert [g.dtype for g in grads] == [t.dtype for t in leaves]
        results.append(outs + list(grads))
    for a, b in zip(*results, strict=True):
        scale = b.detach().float().abs().max().item()
        torch.testing.assert_close(
            a.detach().float(), b.detach().float(), rtol=2e-2, atol=2e-2 * scale
        )


@pytest.mark.parametrize("op", range(2), ids=["cfconv", "painn"])
def test_fused_ops_backward_under_saved_tensor_hooks(op):
    """First and second derivatives taken while saved-tensor hooks are active (activation
    accounting in tools/profile_throughput.py, which wraps a whole training step) equal
    those taken without (torch.func transforms refuse to run under such hooks)."""
    from megagnn.profiling import count_saved_activations

    name, fused, reference, leaves, args = _fused_ops(torch.float64, nodes=6, edges=40, h=4)[op]
    results = []
    for hooked in (False, True):
        for t in leaves:
            t.grad = None
            t.requires_grad_()
        with count_saved_activations(torch.nn.Linear(1, 1)) if hooked else nullcontext():
            first = torch.autograd.grad(_total(fused(*args)), leaves[0], create_graph=True)[0]
            first.square().sum().backward()
        results.append([first.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kernels_depend_on_nothing_in_megagnn():
    """Layers point one way: megagnn.ops imports the kernels, never the reverse."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("megagnn"), f"{path.name} imports {name}"


def test_auto_keeps_the_reference_for_messages_differentiated_twice():
    """Conservative-force training differentiates the messages twice, where the fused kernels
    recompute through the reference: ``auto`` takes the reference there, kernels elsewhere."""
    from types import SimpleNamespace

    from ase.build import bulk

    from megagnn.config import ModelConfig
    from megagnn.data import atoms_to_graph, to_device
    from megagnn.models import build_model

    on_gpu = SimpleNamespace(is_cuda=True)
    edges = SimpleNamespace(receivers_sorted=True, differentiated_twice=False)
    twice = SimpleNamespace(receivers_sorted=True, differentiated_twice=True)
    with ops.use_backend("auto"):
        assert ops._fused(on_gpu, edges) and not ops._fused(on_gpu, twice)
    with ops.use_backend("triton"):
        assert ops._fused(on_gpu, twice)
        ops.set_deterministic(True)  # the fused backward adds with atomics
        try:
            assert not ops._fused(on_gpu, edges)
        finally:
            ops.set_deterministic(False)
    # the model marks its edges so when, and only when, it trains conservative forces
    model = build_model(ModelConfig(hidden=8, layers=1, num_rbf=4, cutoff=3.0))
    batch = to_device(atoms_to_graph(bulk("Cu", "fcc", a=3.6), 3.0), "cpu", torch.float64)
    model = model.double()
    seen = []
    ops_painn = ops.painn_message

    def spy(phi, v, e, mlp):
        seen.append(e.differentiated_twice)
        return ops_painn(phi, v, e, mlp)

    import megagnn.models.painn as painn

    original, painn.painn_message = painn.painn_message, spy
    try:
        model.train()(batch)
        model.eval()(batch)
    finally:
        painn.painn_message = original
    assert seen == [True, False]


def test_tf32_dot_option_reaches_the_kernels():
    """The tf32 option changes only how the filter MLP multiplies (the interpreter runs the
    dot in fp32, so this checks the plumbing; tensor cores are checked compiled, in
    test_kernels_aot.py); ieee comes back after."""
    from megagnn.kernels import cfconv, cfconv_reference, common

    x, rbf, env, index, *weights = _cfconv_inputs(7, 30, 16, 8, 16, torch.float32)
    inputs = (x, rbf, env, index, 7, *weights)
    ops.set_dot_precision("tf32")
    try:
        assert common.dot_code(torch.float32) == 1 and common.dot_code(torch.float64) == 0
        out = cfconv(*inputs)
    finally:
        ops.set_dot_precision("ieee")
    torch.testing.assert_close(out, cfconv_reference(*inputs), rtol=1e-2, atol=1e-3)
    assert common.dot_code(torch.float32) == 0
    with pytest.raises(ValueError, match="dot precision"):
        ops.set_dot_precision("fp8")


@pytest.mark.parametrize("entry", range(1, 4))
def test_every_autotuning_entry_matches_the_reference(entry):
    """Entry ``entry`` of every launcher's set (kernels/tuning.py; the defaults are the
    tests above): outputs and first derivatives, with channels wider than the widest block
    and more edges than the longest step, in fp64."""
    from megagnn.kernels import cfconv, cfconv_reference, painn_message, painn_message_reference
    from megagnn.kernels.tuning import forcing, set_sizes

    assert set_sizes() == 4  # a longer set needs its entries here
    dt = torch.float64
    with forcing(entry):
        src = torch.randn(300, 260, dtype=dt)
        receiver = torch.randint(0, 9, (300,)).sort().values
        for order in (receiver, receiver[torch.randperm(300)]):
            out = segment_sum(src, order, 9)
            torch.testing.assert_close(out, segment_sum_reference(src, order, 9), **TOL[dt])
        params, coeff = _basis(0, 8, 4.0)
        vec = torch.randn(300, 3, dtype=dt).requires_grad_()  # lengths to past the cutoff
        outs = [
            f(vec, params.to(dt), 0, 4.0, 6, coeff) for f in (radial_basis, radial_basis_reference)
        ]
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, **TOL[dt])
        grads = [torch.autograd.grad(sum(t.sum() for t in out), vec)[0] for out in outs]
        torch.testing.assert_close(*grads, **TOL[dt])
        x, rbf, env, index, *weights = _cfconv_inputs(9, 150, 140, 8, 9, dt)
        args = (x, rbf, env, index, 9, *weights, 0)
        _assert_matches(cfconv, cfconv_reference, args, [x, rbf, env, *weights], dt)
        phi, v, rbf, env, unit, index, *weights = _painn_inputs(9, 150, 70, 8, 9, dt)
        args = (phi, v, rbf, env, unit, index, 9, *weights, 1)
        inputs = [phi, v, rbf, env, unit, *weights]
        _assert_matches(painn_message, painn_message_reference, args, inputs, dt)


def test_autotuning_times_each_entry_once_per_shape_class(monkeypatch):
    """With autotuning on, the first launch of a shape class times every entry and keeps
    the fastest; later launches of the class reuse it (a fake clock: CPU has no GPU timer)."""
    from megagnn.kernels import tuning

    timed = []

    def fake_time(fn):
        fn()
        timed.append(len(timed))
        return [3.0, 1.0, 2.0, 4.0][len(timed) - 1]  # entry 1 is "fastest"

    monkeypatch.setattr(tuning, "_time", fake_time)
    monkeypatch.setattr(tuning, "_best", {})
    tuning.set_autotune(True)
    try:
        src = torch.randn(50, 33, dtype=torch.float64)
        index = torch.randint(0, 6, (50,)).sort().values
        out = segment_sum(src, index, 6)
        assert len(timed) == len(tuning.CONFIGS["segment_sum_csr"]) == 4
        ((name, _), best), *_ = tuning._best.items()
        assert name == "segment_sum_csr" and best == tuning.CONFIGS[name][1]
        torch.testing.assert_close(out, segment_sum_reference(src, index, 6), **TOL[src.dtype])
        segment_sum(src[:40], index[:40], 6)  # the same class of sizes: no new timing
        assert len(timed) == 4
    finally:
        tuning.set_autotune(False)
