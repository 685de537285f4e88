"""Pieces the message-passing kernels share: CSR row pointers and the per-node program
prologue, the radial filter MLP (in Triton and in torch), the stores and launch geometry of
the fused ops' backward kernels, and the recompute rule of their second derivatives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

SSP, SILU = 0, 1  # filter activations: shifted softplus (SchNet), SiLU (PaiNN)
# how the filter MLP's tl.dot multiplies fp32 values: exactly (IEEE fp32 FMA, the default:
# fp32 parity with the reference), or on tensor cores as tf32 or bf16 operands (fp32
# accumulation; about 1e-3 and 1e-2 relative error). fp64 launches always multiply in fp64.
DOT_PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2}
_dot_precision = "ieee"


def set_dot_precision(name: str) -> None:
    global _dot_precision
    if name not in DOT_PRECISIONS:
        raise ValueError(f"dot precision {name!r}: use one of {tuple(DOT_PRECISIONS)}")
    _dot_precision = name


def dot_code(acc: torch.dtype) -> int:
    """The DOT constexpr of a launch accumulating in ``acc``."""
    return 0 if acc == torch.float64 else DOT_PRECISIONS[_dot_precision]


def csr_pointers(receiver: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Row pointers [N + 1] of receiver-sorted edges (node k's edges: ptr[k] .. ptr[k + 1])."""
    bounds = torch.arange(num_nodes + 1, device=receiver.device, dtype=receiver.dtype)
    return torch.searchsorted(receiver, bounds)


def block(n: int, low: int = 16, high: int | None = None) -> int:
    """A power-of-two block covering ``n`` (at least ``low``: tl.dot needs 16)."""
    size = max(low, triton.next_power_of_2(max(n, 1)))
    return size if high is None else min(size, high)


@triton.jit
def node_program(ptr_ptr, H, BLOCK_H: tl.constexpr):
    """This program's receiver node, channel block (and its mask) and CSR edge range."""
    node = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = tl.load(ptr_ptr + node)
    end = tl.load(ptr_ptr + node + 1)
    return node, cols, cols < H, start, end


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """a @ b at the DOT precision (see DOT_PRECISIONS), in a's accumulation dtype."""
    if DOT == 1:
        return tl.dot(a, b, input_precision="tf32")
    if DOT == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def act_fn(h, ACT: tl.constexpr):
    if ACT == 0:  # shifted softplus as torch computes it: linear above 20, then minus log 2
        soft = tl.maximum(h, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(h)))
        return tl.where(h > 20.0, h, soft) - 0.6931471805599453
    return h / (1.0 + tl.exp(-h))


@triton.jit
def load_first_layer(
    w1_ptr, b1_ptr, K, R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr
):
    """The filter's first layer W1 [R, K] and b1 [R], zero-padded to the blocks."""
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    mask = (rs < R)[:, None] & (ks < K)[None, :]
    w1 = tl.load(w1_ptr + rs[:, None] * K + ks[None, :], mask=mask, other=0)
    b1 = tl.load(b1_ptr + rs, mask=rs < R, other=0)
    return w1.to(ACC), b1.to(ACC)


@triton.jit
def load_last_rows(w2_ptr, b2_ptr, out_rows, out_ok, R, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Rows ``out_rows`` of the filter's last layer: W2 [BH, BR] and b2 [BH]."""
    rs = tl.arange(0, BLOCK_R)
    mask = out_ok[:, None] & (rs < R)[None, :]
    w2 = tl.load(w2_ptr + out_rows[:, None] * R + rs[None, :], mask=mask, other=0)
    return w2.to(ACC), tl.load(b2_ptr + out_rows, mask=out_ok, other=0).to(ACC)


@triton.jit
def filter_hidden(
    rbf_ptr, rows64, edge_ok, w1, b1, K, R,
    ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """(pre, act(pre)) with pre = rbf W1ᵀ + b1 for edges ``rows64`` -> [BE, BR] each;
    padded hidden units are 0."""
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    mask = edge_ok[:, None] & (ks < K)[None, :]
    rbf = tl.load(rbf_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0).to(ACC)
    pre = mm(rbf, tl.trans(w1), DOT) + b1[None, :]
    return pre, tl.where((rs < R)[None, :], act_fn(pre, ACT), 0.0)


@triton.jit
def act_grad(pre, ACT: tl.constexpr):
    """d act / d pre: sigmoid for the shifted softplus (1 where torch's is linear, above
    20), s (1 + pre (1 - s)) for SiLU."""
    s = 1.0 / (1.0 + tl.exp(-pre))
    if ACT == 0:
        return tl.where(pre > 20.0, 1.0, s)
    return s * (1.0 + pre * (1.0 - s))


@triton.jit
def store_filter_grads(
    g_hidden, pre, w1, rows64, edge_ok, g_pre_ptr, g_rbf_ptr, K, R,
    ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """From dL/dhidden [BE, BR] of a block of edges: store dL/dpre [E, R] (for dL/dW1, db1)
    and dL/drbf [E, K]."""
    rs = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    g_pre = tl.where((rs < R)[None, :], g_hidden * act_grad(pre, ACT), 0.0)
    mask = edge_ok[:, None] & (rs < R)[None, :]
    tl.store(g_pre_ptr + rows64[:, None] * R + rs[None, :], g_pre, mask=mask)
    g_rbf = mm(g_pre, w1, DOT)  # [BE, BK]
    mask = edge_ok[:, None] & (ks < K)[None, :]
    tl.store(g_rbf_ptr + rows64[:, None] * K + ks[None, :], g_rbf, mask=mask)


@triton.jit
def split_rows(split, offset, edges_per_split, E, BLOCK_E: tl.constexpr):
    """Edges ``offset`` .. ``offset + BLOCK_E`` of split ``split``: int64 indices, mask."""
    local = offset + tl.arange(0, BLOCK_E)
    rows = split * edges_per_split + local
    return rows.to(tl.int64), (rows < E) & (local < edges_per_split)


@triton.jit
def store_weight_grads(g_w2_ptr, g_b2_ptr, rows, row_ok, acc_w2, acc_b2, R, BLOCK_R: tl.constexpr):
    """A split's partial dL/dW2 [BH, R] and dL/db2 [BH] at output rows ``rows`` (int64)."""
    rs = tl.arange(0, BLOCK_R)
    mask = row_ok[:, None] & (rs < R)[None, :]
    tl.store(g_w2_ptr + rows[:, None] * R + rs[None, :], acc_w2, mask=mask)
    tl.store(g_b2_ptr + rows, acc_b2, mask=row_ok)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays, everything else adds in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FilterGrads:
    """Buffers and launch geometry of the fused ops' backward kernels: per-edge gradients of
    the filter's hidden pre-activation [E, R], basis [E, K] and envelope [E], and per-split
    partial sums of the last layer's weight [S, out, R] and bias [S, out]. The weight
    kernel runs (channel blocks x S) programs, S chosen so that about 256 are in flight."""

    def __init__(self, rbf: torch.Tensor, w1: torch.Tensor, dtype: torch.dtype, outputs: int):
        self.rbf, self.dtype, self.outputs = rbf, dtype, outputs
        (self.edges, self.k), self.r = rbf.shape, w1.shape[0]
        self.g_pre = self.new((self.edges, self.r))
        self.g_rbf = self.new((self.edges, self.k))
        self.g_env = self.new((self.edges,))
        self.g_w2, self.g_b2 = self.new((1, outputs, self.r)), self.new((1, outputs))
        self.per_split = 0

    def new(self, shape) -> torch.Tensor:
        return torch.zeros(shape, device=self.rbf.device, dtype=self.dtype)

    def launch(self, h: int, act: int, block_h: int, block_e: int) -> tuple[dict, tuple, tuple]:
        """(kernel constants, edge-kernel grid, weight-kernel grid) for H = ``h`` channels,
        at most ``block_h`` channels a program and ``block_e`` edges a step."""
        block_h = block(h, high=block_h)
        channel_blocks = triton.cdiv(h, block_h)
        splits = min(triton.cdiv(self.edges, block_e), max(1, 256 // channel_blocks))
        self.per_split = triton.cdiv(triton.cdiv(self.edges, splits), block_e) * block_e
        splits = triton.cdiv(self.edges, self.per_split)
        self.g_w2 = self.new((splits, self.outputs, self.r))
        self.g_b2 = self.new((splits, self.outputs))
        consts = dict(E=self.edges, H=h, K=self.k, R=self.r, ACT=act, BLOCK_E=block_e)
        consts.update(BLOCK_K=block(self.k), BLOCK_R=block(self.r), BLOCK_H=block_h)
        consts["ACC"] = tl.float64 if self.dtype == torch.float64 else tl.float32
        consts["DOT"] = dot_code(self.dtype)
        return consts, (triton.cdiv(self.edges, block_e),), (channel_blocks, splits)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """dL/dW1 [R, K], dL/db1 [R], dL/dW2 [out, R], dL/db2 [out]."""
        g_w1 = self.g_pre.T @ self.rbf.to(self.dtype)
        return g_w1, self.g_pre.sum(0), self.g_w2.sum(0), self.g_b2.sum(0)


def cast_like(grads, like) -> tuple[torch.Tensor, ...]:
    return tuple(g.to(t.dtype) for g, t in zip(grads, like, strict=True))


def filter_reference(rbf, env, w1, b1, w2, b2, act: int) -> torch.Tensor:
    """The radial filter W(rbf) u in torch: [E, K], [E] -> [E, out]."""
    hidden = torch.nn.functional.linear(rbf, w1, b1)
    if act == SSP:
        hidden = torch.nn.functional.softplus(hidden) - 0.6931471805599453
    else:
        hidden = torch.nn.functional.silu(hidden)
    return torch.nn.functional.linear(hidden, w2, b2) * env.unsqueeze(-1)


def _leaves(tensors) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]


def _grads(outputs, inputs, grad_outputs, create_graph: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]


class _RecomputedBackward(torch.autograd.Function):
    """(grad_outputs, inputs) -> gradients of ``op`` at ``inputs``, by ``first_order`` or by
    recomputing ``op`` in torch on detached copies of the inputs; its own backward (the
    second derivatives) recomputes in torch. Third derivatives are not supported."""

    @staticmethod
    def forward(ctx, op, n_grads, first_order, *tensors):
        ctx.op, ctx.n_grads = op, n_grads
        ctx.save_for_backward(*tensors)
        if first_order is not None:
            return tuple(first_order(*tensors))
        leaves = _leaves(tensors[n_grads:])
        with torch.enable_grad():
            return tuple(_grads(op(*leaves), leaves, tensors[:n_grads], create_graph=False))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_grads):
        tensors = _leaves(ctx.saved_tensors)
        grad_outputs, inputs = tensors[: ctx.n_grads], tensors[ctx.n_grads :]
        with torch.enable_grad():
            first = _grads(ctx.op(*inputs), inputs, grad_outputs, create_graph=True)
            pairs = [(f, gg) for f, gg in zip(first, grad_grads, strict=True) if f.requires_grad]
            if not pairs:
                return (None, None, None, *(torch.zeros_like(t) for t in tensors))
            outputs, weights = zip(*pairs, strict=True)
            return (None, None, None, *_grads(outputs, tensors, weights, create_graph=False))


def recompute_vjp(
    op: Callable, inputs: Sequence[torch.Tensor], grads, first_order: Callable | None = None
) -> tuple:
    """Vector-Jacobian product of ``op`` at ``inputs`` with ``grads`` (a tensor or a tuple,
    one per output of ``op``): the fused kernels' backward.

    ``first_order(*grads, *inputs)`` computes it (backward kernels) where given; otherwise
    ``op``'s forward is recomputed in torch and differentiated. Either way the result is
    differentiable once more, by a recompute in torch (conservative-force training needs
    second derivatives).

    The recompute runs on detached copies of the inputs: autograd on the saved tensors
    themselves would also follow their history (a previous layer's output shares the basis
    and envelope with this one) and count those paths twice. Unlike ``torch.func.vjp`` this
    also works under saved-tensor hooks (activation checkpointing, activation accounting).
    """
    grads = grads if isinstance(grads, tuple) else (grads,)
    return _RecomputedBackward.apply(op, len(grads), first_order, *grads, *inputs)
