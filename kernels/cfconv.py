"""Fused continuous-filter convolution: out[i] = Σ_{e: j -> i} W(rbf_e) u_e ⊙ x[j].

The filter W is the two-layer radial MLP  W(rbf) = W2 act(W1 rbf + b1) + b2  (act: shifted
softplus or SiLU). The kernel walks each receiver's edges (receiver-sorted, CSR) and
computes the filter inside, so neither the [E, H] filter nor the [E, H] message is ever
stored: the flash-attention idea applied to message passing. W2/b2 may be a tensor-parallel
slice (H/tp output channels); x then holds the same channels.

Backward recomputes through the PyTorch reference (``common.recompute_vjp``; the [E, H]
tensors exist only transiently inside backward), which also makes the op twice
differentiable. 16-bit ``x`` is accumulated in fp32 and the output cast back to its dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megagnn.kernels.common import (
    SILU,
    SSP,
    block,
    csr_pointers,
    filter_hidden,
    filter_reference,
    load_first_layer,
    load_last_rows,
    recompute_vjp,
)

__all__ = ["SILU", "SSP", "cfconv", "cfconv_reference"]


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

        gx, grbf, genv, gw1, gb1, gw2, gb2 = recompute_vjp(op, (x, rbf, env, w1, b1, w2, b2), grad)
        return gx, grbf, genv, None, None, gw1, gb1, gw2, gb2, None


def cfconv(x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act=SSP):
    """Σ over each receiver's incoming edges of filter(rbf) * env * x[sender] -> [N, H].

    ``edge_index`` must be sorted by receiver; ``w1 [R, K]``, ``w2 [H, R]`` as in nn.Linear.
    """
    return CFConv.apply(x, rbf, env, edge_index, num_nodes, w1, b1, w2, b2, act)
