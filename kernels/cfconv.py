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

from functools import partial

import torch
import triton
import triton.language as tl
from megagnn.kernels.common import (
    SILU,
    SSP,
    act_fn,
    block,
    csr_pointers,
    filter_hidden,
    filter_reference,
    load_first_layer,
    load_last_rows,
    recompute_vjp,
)

__all__ = ["SILU", "SSP", "cfconv", "cfconv_reference"]

BLOCK_E = 16  # edges per step (tl.dot needs at least 16 rows)


@triton.jit
def _cfconv_kernel(
    x_ptr, rbf_ptr, env_ptr, sender_ptr, ptr_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    H, K, R, max_degree,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    node = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    # the filter MLP's weights for this channel block stay in registers for all edges
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    w2, b2 = load_last_rows(w2_ptr, b2_ptr, cols, col_ok, R, BLOCK_R, ACC)
    start = tl.load(ptr_ptr + node)
    end = tl.load(ptr_ptr + node + 1)
    acc = tl.zeros((BLOCK_H,), dtype=ACC)
    for offset in range(0, max_degree, BLOCK_E):
        rows = start + offset + tl.arange(0, BLOCK_E)
        ok = rows < end
        rows64 = rows.to(tl.int64)
        hidden = filter_hidden(rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC)
        w = tl.dot(hidden, tl.trans(w2), input_precision="ieee") + b2[None, :]  # [BE, BH]
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        xs = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0)
        acc += tl.sum(tl.where(eh_ok, w * env[:, None] * xs.to(ACC), 0.0), axis=0)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + node.to(tl.int64) * H + cols, out, mask=col_ok)


@triton.jit
def _act_grad(pre, ACT: tl.constexpr):
    """d act / d pre: sigmoid for the shifted softplus (1 where torch's is linear, above
    20), s (1 + pre (1 - s)) for SiLU."""
    s = 1.0 / (1.0 + tl.exp(-pre))
    if ACT == 0:
        return tl.where(pre > 20.0, 1.0, s)
    return s * (1.0 + pre * (1.0 - s))


@triton.jit
def _cfconv_bwd_edges_kernel(
    grad_ptr, x_ptr, rbf_ptr, env_ptr, sender_ptr, receiver_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    gx_ptr, g_pre_ptr, g_env_ptr, g_rbf_ptr,
    E, H, K, R,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One block of edges, all channels: dL/dx (atomics at the senders), and per edge
    dL/du, dL/dpre (the filter's hidden pre-activation) and dL/drbf."""
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = rows < E
    rows64 = rows.to(tl.int64)
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    ks = tl.arange(0, BLOCK_K)
    rbf = tl.load(
        rbf_ptr + rows64[:, None] * K + ks[None, :], mask=ok[:, None] & (ks < K)[None, :], other=0
    ).to(ACC)
    pre = tl.dot(rbf, tl.trans(w1), input_precision="ieee") + b1[None, :]  # [BE, BR]
    rs = tl.arange(0, BLOCK_R)
    hidden = tl.where((rs < R)[None, :], act_fn(pre, ACT), 0.0)
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
        w = tl.dot(hidden, tl.trans(w2), input_precision="ieee") + b2[None, :]  # [BE, BH]
        g = tl.load(grad_ptr + receiver[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        x = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        g_w = tl.where(eh_ok, g * x * env[:, None], 0.0)  # dL/dW [BE, BH]
        g_env += tl.sum(tl.where(eh_ok, g * x * w, 0.0), axis=1)
        g_hidden += tl.dot(g_w, w2, input_precision="ieee")
        gx = g * w * env[:, None]
        tl.atomic_add(gx_ptr + sender[:, None] * H + cols[None, :], gx, mask=eh_ok)
    g_pre = tl.where((rs < R)[None, :], g_hidden * _act_grad(pre, ACT), 0.0)  # [BE, BR]
    er_ok = ok[:, None] & (rs < R)[None, :]
    tl.store(g_pre_ptr + rows64[:, None] * R + rs[None, :], g_pre, mask=er_ok)
    tl.store(g_env_ptr + rows64, g_env, mask=ok)
    g_rbf = tl.dot(g_pre, w1, input_precision="ieee")  # [BE, BK]
    tl.store(
        g_rbf_ptr + rows64[:, None] * K + ks[None, :], g_rbf, mask=ok[:, None] & (ks < K)[None, :]
    )


@triton.jit
def _cfconv_bwd_weights_kernel(
    grad_ptr, x_ptr, rbf_ptr, env_ptr, sender_ptr, receiver_ptr, w1_ptr, b1_ptr,
    g_w2_ptr, g_b2_ptr,
    E, H, K, R, edges_per_split,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One channel block over one split of the edges: the split's share of dL/dW2 [BH, R]
    and dL/db2 (summed over splits afterwards: no atomics on the weights)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    col_ok = cols < H
    rs = tl.arange(0, BLOCK_R)
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    acc_w2 = tl.zeros((BLOCK_H, BLOCK_R), dtype=ACC)
    acc_b2 = tl.zeros((BLOCK_H,), dtype=ACC)
    first = split * edges_per_split
    for offset in range(0, edges_per_split, BLOCK_E):
        rows = first + offset + tl.arange(0, BLOCK_E)
        ok = (rows < E) & (offset + tl.arange(0, BLOCK_E) < edges_per_split)
        rows64 = rows.to(tl.int64)
        hidden = filter_hidden(rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC)
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        receiver = tl.load(receiver_ptr + rows64, mask=ok, other=0).to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        g = tl.load(grad_ptr + receiver[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        x = tl.load(x_ptr + sender[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
        g_w = tl.where(eh_ok, g * x * env[:, None], 0.0)  # [BE, BH]
        acc_w2 += tl.dot(tl.trans(g_w), hidden, input_precision="ieee")
        acc_b2 += tl.sum(g_w, axis=0)
    base = split.to(tl.int64) * H
    mask = col_ok[:, None] & (rs < R)[None, :]
    tl.store(g_w2_ptr + (base + cols)[:, None] * R + rs[None, :], acc_w2, mask=mask)
    tl.store(g_b2_ptr + base + cols, acc_b2, mask=col_ok)


def _cfconv_grads(grad, x, rbf, env, edge_index, w1, b1, w2, b2, act):
    """First derivatives (x, rbf, env, W1, b1, W2, b2) by the two backward kernels: the
    [E, H] filter and message gradients live only in registers; [E, R] and [E, K] ones
    (R, K << H) are stored."""
    (e, k), (n, h), r = rbf.shape, x.shape, w1.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    new = partial(torch.zeros, device=x.device, dtype=acc_dtype)
    gx, g_pre, g_env, g_rbf = new((n, h)), new((e, r)), new((e,)), new((e, k))
    g_w2, g_b2 = new((1, h, r)), new((1, h))
    if e and h:
        sender, receiver = (t.contiguous() for t in edge_index)
        tensors = (grad.contiguous(), x.contiguous(), rbf.contiguous(), env.contiguous())
        tensors += (sender, receiver, w1.contiguous(), b1.contiguous())
        block_h = block(h, high=64)
        consts = dict(ACT=act, BLOCK_E=BLOCK_E, BLOCK_K=block(k), BLOCK_R=block(r))
        acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
        consts.update(BLOCK_H=block_h, ACC=acc)
        _cfconv_bwd_edges_kernel[(triton.cdiv(e, BLOCK_E),)](
            *tensors,
            w2.contiguous(),
            b2.contiguous(),
            gx,
            g_pre,
            g_env,
            g_rbf,
            e,
            h,
            k,
            r,
            **consts,
        )
        # split the edges so that (channel blocks x splits) programs fill the device
        splits = min(triton.cdiv(e, BLOCK_E), max(1, 256 // triton.cdiv(h, block_h)))
        per_split = triton.cdiv(triton.cdiv(e, splits), BLOCK_E) * BLOCK_E
        splits = triton.cdiv(e, per_split)
        g_w2, g_b2 = new((splits, h, r)), new((splits, h))
        _cfconv_bwd_weights_kernel[(triton.cdiv(h, block_h), splits)](
            *tensors, g_w2, g_b2, e, h, k, r, per_split, **consts
        )
    g_w1 = g_pre.T @ rbf.to(acc_dtype)  # [R, K]
    grads = (gx, g_rbf, g_env, g_w1, g_pre.sum(0), g_w2.sum(0), g_b2.sum(0))
    like = (x, rbf, env, w1, b1, w2, b2)
    return tuple(g.to(t.dtype) for g, t in zip(grads, like, strict=True))


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
        out = x.new_empty((num_nodes, h))
        if num_nodes == 0 or h == 0:
            return out
        ptr, max_degree = csr_pointers(edge_index[1], num_nodes)
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        block_h = block(h, high=64)
        grid = (num_nodes, triton.cdiv(h, block_h))
        _cfconv_kernel[grid](
            x.contiguous(), rbf.contiguous(), env.contiguous(), edge_index[0].contiguous(), ptr,
            w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out,
            h, rbf.shape[1], w1.shape[0], max_degree,
            ACT=act, BLOCK_E=16, BLOCK_K=block(rbf.shape[1]), BLOCK_R=block(w1.shape[0]),
            BLOCK_H=block_h, ACC=acc,
        )  # fmt: skip
        return out

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
