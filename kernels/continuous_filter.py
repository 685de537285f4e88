"""Fused continuous-filter convolution: out[i] = Σ_{e: j -> i} W(rbf_e) u_e ⊙ x[j].

The filter W is the two-layer radial MLP  W(rbf) = W2 act(W1 rbf + b1) + b2  (act: shifted
softplus or SiLU). The kernel walks each receiver's edges (receiver-sorted, CSR) and
computes the filter inside, so neither the [E, H] filter nor the [E, H] message is ever
stored: the flash-attention idea applied to message passing. W2/b2 may be a tensor-parallel
slice (H/tp output channels); x then holds the same channels.

Backward: two kernels give the first derivatives, again without storing an [E, H] tensor
(only [E, R] and [E, K] ones, R, K << H). One walks blocks of edges over all channels
(dL/dx by atomics at the senders, dL/du, and the filter's hidden and basis gradients),
the other walks channel blocks over splits of the edges (dL/dW2, dL/db2: partial sums
added afterwards, no atomics on the weights). Second derivatives (force training
differentiates the first) recompute through the PyTorch reference
(``common.recompute_vjp``). 16-bit ``x`` is accumulated in fp32 and the output cast back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    SILU,
    SSP,
    FilterGrads,
    acc_dtype,
    block,
    cast_like,
    csr_pointers,
    dot_code,
    filter_hidden,
    filter_reference,
    load_first_layer,
    load_last_rows,
    mm,
    node_program,
    recompute_vjp,
    split_rows,
    store_filter_grads,
    store_weight_grads,
)
from .tuning import Config, choose, size_class

__all__ = ["SILU", "SSP", "cfconv", "cfconv_reference"]


@triton.jit
def _cfconv_kernel(
    x_ptr, rbf_ptr, env_ptr, sender_ptr, ptr_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    H, K, R,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    node, cols, col_ok, start, end = node_program(ptr_ptr, H, BLOCK_H)
    # the filter MLP's weights for this channel block stay in registers for all edges
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    w2, b2 = load_last_rows(w2_ptr, b2_ptr, cols, col_ok, R, BLOCK_R, ACC)
    acc = tl.zeros((BLOCK_H,), dtype=ACC)
    for first in range(start, end, BLOCK_E):  # this node's edges only
        rows = first + tl.arange(0, BLOCK_E)
        ok = rows < end
        rows64 = rows.to(tl.int64)
        _, hidden = filter_hidden(
            rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT
        )
        w = mm(hidden, tl.trans(w2), DOT) + b2[None, :]  # [BE, BH]
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        xs = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0)
        acc += tl.sum(tl.where(eh_ok, w * env[:, None] * xs.to(ACC), 0.0), axis=0)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + node.to(tl.int64) * H + cols, out, mask=col_ok)


@triton.jit
def _cfconv_bwd_edges_kernel(
    grad_ptr, x_ptr, rbf_ptr, env_ptr, sender_ptr, receiver_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    gx_ptr, g_pre_ptr, g_env_ptr, g_rbf_ptr,
    E, H, K, R,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One block of edges, all channels: dL/dx (atomics at the senders), and per edge
    dL/du and the filter's hidden and basis gradients."""
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = rows < E
    rows64 = rows.to(tl.int64)
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    pre, hidden = filter_hidden(rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT)
    env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
    sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
    receiver = tl.load(receiver_ptr + rows64, mask=ok, other=0).to(tl.int64)
    g_hidden = tl.zeros((BLOCK_E, BLOCK_R), dtype=ACC)
    g_env = tl.zeros((BLOCK_E,), dtype=ACC)
    for c in range(0, H, BLOCK_H):
        cols = c + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        eh_ok = ok[:, None] & col_ok[None, :]
        w2, b2 = load_last_rows(w2_ptr, b2_ptr, cols, col_ok, R, BLOCK_R, ACC)
        w = mm(hidden, tl.trans(w2), DOT) + b2[None, :]  # [BE, BH]
        g = tl.load(grad_ptr + receiver[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        x = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        g_w = tl.where(eh_ok, g * x * env[:, None], 0.0)  # dL/dW [BE, BH]
        g_env += tl.sum(tl.where(eh_ok, g * x * w, 0.0), axis=1)
        g_hidden += mm(g_w, w2, DOT)
        gx = g * w * env[:, None]
        tl.atomic_add(gx_ptr + sender[:, None] * H + cols[None, :], gx, mask=eh_ok)
    tl.store(g_env_ptr + rows64, g_env, mask=ok)
    store_filter_grads(
        g_hidden, pre, w1, rows64, ok, g_pre_ptr, g_rbf_ptr, K, R, ACT, BLOCK_K, BLOCK_R, DOT
    )


@triton.jit
def _cfconv_bwd_weights_kernel(
    grad_ptr, x_ptr, rbf_ptr, env_ptr, sender_ptr, receiver_ptr, w1_ptr, b1_ptr,
    g_w2_ptr, g_b2_ptr,
    E, H, K, R, edges_per_split,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One channel block over one split of the edges: the split's share of dL/dW2 [BH, R]
    and dL/db2 (summed over splits afterwards: no atomics on the weights)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    col_ok = cols < H
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    acc_w2 = tl.zeros((BLOCK_H, BLOCK_R), dtype=ACC)
    acc_b2 = tl.zeros((BLOCK_H,), dtype=ACC)
    for offset in range(0, edges_per_split, BLOCK_E):
        rows64, ok = split_rows(split, offset, edges_per_split, E, BLOCK_E)
        _, hidden = filter_hidden(
            rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT
        )
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        receiver = tl.load(receiver_ptr + rows64, mask=ok, other=0).to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        g = tl.load(grad_ptr + receiver[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        x = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        g_w = tl.where(eh_ok, g * x * env[:, None], 0.0)  # [BE, BH]
        acc_w2 += mm(tl.trans(g_w), hidden, DOT)
        acc_b2 += tl.sum(g_w, axis=0)
    rows = split.to(tl.int64) * H + cols
    store_weight_grads(g_w2_ptr, g_b2_ptr, rows, col_ok, acc_w2, acc_b2, R, BLOCK_R)


def _cfconv_grads(grad, x, rbf, env, edge_index, w1, b1, w2, b2, act):
    """First derivatives (x, rbf, env, W1, b1, W2, b2) by the two backward kernels: the
    [E, H] filter and message gradients live only in registers; [E, R] and [E, K] ones
    (R, K << H) are stored."""
    h = x.shape[1]
    like = (x, rbf, env, w1, b1, w2, b2)
    sender, receiver = (t.contiguous() for t in edge_index)
    tensors = (grad.contiguous(), x.contiguous(), rbf.contiguous(), env.contiguous())
    tensors += (sender, receiver, w1.contiguous(), b1.contiguous())

    def run(cfg: Config) -> tuple[torch.Tensor, ...]:
        grads = FilterGrads(rbf, w1, acc_dtype(x.dtype), outputs=h)
        gx = grads.new(x.shape)
        if grads.edges and h:
            consts, edge_grid, weight_grid = grads.launch(h, act, cfg.block_h, cfg.block_e)
            _cfconv_bwd_edges_kernel[edge_grid](
                *tensors, w2.contiguous(), b2.contiguous(),
                gx, grads.g_pre, grads.g_env, grads.g_rbf, **consts, **cfg.options(),
            )  # fmt: skip
            _cfconv_bwd_weights_kernel[weight_grid](
                *tensors, grads.g_w2, grads.g_b2, edges_per_split=grads.per_split, **consts
            )
        return cast_like((gx, grads.g_rbf, grads.g_env, *grads.weights()), like)

    key = (x.dtype, h, rbf.shape[1], w1.shape[0], size_class(rbf.shape[0]))
    return choose("cfconv_backward", key, run)


def cfconv_reference(x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act=SSP):
    """The specification in torch: materialises the [E, H] filter and messages."""
    sender, receiver = edge_index
    msg = x[sender] * filter_reference(rbf, env, w1, b1, w2, b2, act)  # [E, H]
    out = msg.new_zeros((num_nodes, x.shape[1]))
    return out.index_add(0, receiver, msg).to(x.dtype)


class CFConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act):
        ctx.save_for_backward(x, rbf, env, edge_index, w1, b1, w2, b2)
        ctx.num_nodes, ctx.act = num_nodes, act
        h = x.shape[1]
        if num_nodes == 0 or h == 0:
            return x.new_empty((num_nodes, h))
        ptr = csr_pointers(edge_index[1], num_nodes)
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32

        def run(cfg: Config) -> torch.Tensor:
            out = x.new_empty((num_nodes, h))
            block_h = block(h, high=cfg.block_h)
            grid = (num_nodes, triton.cdiv(h, block_h))
            _cfconv_kernel[grid](
                x.contiguous(), rbf.contiguous(), env.contiguous(), edge_index[0].contiguous(),
                ptr, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out,
                h, rbf.shape[1], w1.shape[0],
                ACT=act, BLOCK_E=cfg.block_e, BLOCK_K=block(rbf.shape[1]),
                BLOCK_R=block(w1.shape[0]), BLOCK_H=block_h, ACC=acc,
                DOT=dot_code(acc_dtype(x.dtype)), **cfg.options(),
            )  # fmt: skip
            return out

        key = (x.dtype, h, rbf.shape[1], w1.shape[0], size_class(rbf.shape[0]))
        return choose("cfconv", key, run)

    @staticmethod
    def backward(ctx, grad):
        x, rbf, env, edge_index, w1, b1, w2, b2 = ctx.saved_tensors
        n, act = ctx.num_nodes, ctx.act

        def op(x, rbf, env, w1, b1, w2, b2):
            return cfconv_reference(x, rbf, env, edge_index, n, w1, b1, w2, b2, act)

        def kernels(grad, x, rbf, env, w1, b1, w2, b2):
            return _cfconv_grads(grad, x, rbf, env, edge_index, w1, b1, w2, b2, act)

        inputs = (x, rbf, env, w1, b1, w2, b2)
        gx, grbf, genv, gw1, gb1, gw2, gb2 = recompute_vjp(op, inputs, grad, first_order=kernels)
        return gx, grbf, genv, None, None, gw1, gb1, gw2, gb2, None


def cfconv(x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act=SSP):
    """Σ over each receiver's incoming edges of filter(rbf) * env * x[sender] -> [N, H].

    ``edge_index`` must be sorted by receiver; ``w1 [R, K]``, ``w2 [H, R]`` as in nn.Linear.
    """
    return CFConv.apply(x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act)
