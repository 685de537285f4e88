"""Fused PaiNN message (Schütt et al. 2021, eqs. 7-8) with the filter computed in-kernel:

    x_e  = φ(s)[j] ⊙ W(rbf_e) u_e                     [3H] per edge, parts (s, vv, vs)
    Δs_i = Σ_{e: j -> i} x_e^s
    Δv_i = Σ_{e: j -> i} v_j ⊙ x_e^vv + r̂_e x_e^vs     [3, H]

W is the radial MLP W2 act(W1 rbf + b1) + b2 with 3H outputs, channel-major (channel c,
part k at 3c + k) like φ(s), so a tensor-parallel rank's contiguous slice holds whole
channels. The kernel walks each receiver's edges (receiver-sorted, CSR): neither the
[E, 3H] filter and messages nor the [E, 3, H] vector messages are stored. Backward
recomputes through the PyTorch reference, as the continuous-filter convolution does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megagnn.kernels.common import (
    SILU,
    block,
    csr_pointers,
    filter_hidden,
    filter_reference,
    load_first_layer,
    load_last_rows,
    recompute_vjp,
)

__all__ = ["painn_message", "painn_message_reference"]


@triton.jit
def _part(
    hidden, w2_ptr, b2_ptr, phi_ptr, sender3, cols, col_ok, eh_ok, R,
    KPART: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """φ(s)[j] ⊙ W of one part (KPART: 0 = s, 1 = vv, 2 = vs) for a block of edges."""
    w2, b2 = load_last_rows(w2_ptr, b2_ptr, 3 * cols + KPART, col_ok, R, BLOCK_R, ACC)
    w = tl.dot(hidden, tl.trans(w2), input_precision="ieee") + b2[None, :]  # [BE, BH]
    phi = tl.load(phi_ptr + sender3[:, None] + 3 * cols[None, :] + KPART, mask=eh_ok, other=0)
    return w * phi.to(ACC)


@triton.jit
def _painn_kernel(
    phi_ptr, v_ptr, rbf_ptr, env_ptr, unit_ptr, sender_ptr, ptr_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, ds_ptr, dv_ptr,
    H, K, R, max_degree,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    node = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    start = tl.load(ptr_ptr + node)
    end = tl.load(ptr_ptr + node + 1)
    ds = tl.zeros((BLOCK_H,), dtype=ACC)
    dvx = tl.zeros((BLOCK_H,), dtype=ACC)
    dvy = tl.zeros((BLOCK_H,), dtype=ACC)
    dvz = tl.zeros((BLOCK_H,), dtype=ACC)
    for offset in range(0, max_degree, BLOCK_E):
        rows = start + offset + tl.arange(0, BLOCK_E)
        ok = rows < end
        rows64 = rows.to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        hidden = filter_hidden(rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC)
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)[:, None]
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        # the (small) filter rows are re-read per edge block from L1/L2 rather than held:
        # three [BH, BR] blocks would crowd the registers
        x_s = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 0,
                    BLOCK_R, ACC) * env  # fmt: skip
        x_vv = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 1,
                     BLOCK_R, ACC) * env  # fmt: skip
        x_vs = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 2,
                     BLOCK_R, ACC) * env  # fmt: skip
        ds += tl.sum(tl.where(eh_ok, x_s, 0.0), axis=0)
        v_at = v_ptr + sender[:, None] * 3 * H + cols[None, :]  # v[j, 0, cols]
        vx = tl.load(v_at, mask=eh_ok, other=0).to(ACC)
        vy = tl.load(v_at + H, mask=eh_ok, other=0).to(ACC)
        vz = tl.load(v_at + 2 * H, mask=eh_ok, other=0).to(ACC)
        ux = tl.load(unit_ptr + rows64 * 3, mask=ok, other=0).to(ACC)[:, None]
        uy = tl.load(unit_ptr + rows64 * 3 + 1, mask=ok, other=0).to(ACC)[:, None]
        uz = tl.load(unit_ptr + rows64 * 3 + 2, mask=ok, other=0).to(ACC)[:, None]
        dvx += tl.sum(tl.where(eh_ok, vx * x_vv + ux * x_vs, 0.0), axis=0)
        dvy += tl.sum(tl.where(eh_ok, vy * x_vv + uy * x_vs, 0.0), axis=0)
        dvz += tl.sum(tl.where(eh_ok, vz * x_vv + uz * x_vs, 0.0), axis=0)
    out_ty = ds_ptr.dtype.element_ty
    node64 = node.to(tl.int64)
    tl.store(ds_ptr + node64 * H + cols, ds.to(out_ty), mask=col_ok)
    dv_at = dv_ptr + node64 * 3 * H + cols
    tl.store(dv_at, dvx.to(out_ty), mask=col_ok)
    tl.store(dv_at + H, dvy.to(out_ty), mask=col_ok)
    tl.store(dv_at + 2 * H, dvz.to(out_ty), mask=col_ok)


def painn_message_reference(
    phi, v, rbf, env, unit, edge_index, num_nodes, w1, b1, w2, b2, act=SILU
):
    """The specification in torch: ``phi [N, 3H]`` (φ(s), channel-major), ``v [N, 3, H]``
    -> (Δs [N, H], Δv [N, 3, H]), materialising every per-edge tensor."""
    sender, receiver = edge_index
    x = phi[sender] * filter_reference(rbf, env, w1, b1, w2, b2, act)  # [E, 3H]
    x_s, x_vv, x_vs = x.unflatten(-1, (-1, 3)).unbind(-1)  # [E, H] each
    v_msg = v[sender] * x_vv.unsqueeze(1) + unit.to(x.dtype).unsqueeze(-1) * x_vs.unsqueeze(1)
    ds = x_s.new_zeros((num_nodes, x_s.shape[1])).index_add(0, receiver, x_s)
    dv = v_msg.new_zeros((num_nodes, *v_msg.shape[1:])).index_add(0, receiver, v_msg)
    return ds.to(phi.dtype), dv.to(phi.dtype)


class PaiNNMessage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi, v, rbf, env, unit, edge_index, num_nodes, w1, b1, w2, b2, act):
        ctx.save_for_backward(phi, v, rbf, env, unit, edge_index, w1, b1, w2, b2)
        ctx.num_nodes, ctx.act = num_nodes, act
        h = v.shape[2]
        ds = phi.new_empty((num_nodes, h))
        dv = phi.new_empty((num_nodes, 3, h))
        if num_nodes == 0 or h == 0:
            return ds, dv
        ptr, max_degree = csr_pointers(edge_index[1], num_nodes)
        acc = tl.float64 if phi.dtype == torch.float64 else tl.float32
        block_h = block(h, high=32)
        grid = (num_nodes, triton.cdiv(h, block_h))
        _painn_kernel[grid](
            phi.contiguous(), v.contiguous(), rbf.contiguous(), env.contiguous(),
            unit.contiguous(), edge_index[0].contiguous(), ptr,
            w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), ds, dv,
            h, rbf.shape[1], w1.shape[0], max_degree,
            ACT=act, BLOCK_E=16, BLOCK_K=block(rbf.shape[1]), BLOCK_R=block(w1.shape[0]),
            BLOCK_H=block_h, ACC=acc,
        )  # fmt: skip
        return ds, dv

    @staticmethod
    def backward(ctx, g_ds, g_dv):
        phi, v, rbf, env, unit, edge_index, w1, b1, w2, b2 = ctx.saved_tensors
        n, act = ctx.num_nodes, ctx.act
        h = v.shape[2]
        g_ds = phi.new_zeros((n, h)) if g_ds is None else g_ds
        g_dv = phi.new_zeros((n, 3, h)) if g_dv is None else g_dv

        def op(phi, v, rbf, env, unit, w1, b1, w2, b2):
            return painn_message_reference(
                phi, v, rbf, env, unit, edge_index, n, w1, b1, w2, b2, act
            )

        inputs = (phi, v, rbf, env, unit, w1, b1, w2, b2)
        g_phi, g_v, g_rbf, g_env, g_unit, *g_weights = recompute_vjp(op, inputs, (g_ds, g_dv))
        return g_phi, g_v, g_rbf, g_env, g_unit, None, None, *g_weights, None


def painn_message(phi, v, rbf, env, unit, edge_index, num_nodes, w1, b1, w2, b2, act=SILU):
    """(Δs [N, H], Δv [N, 3, H]) of the PaiNN message; ``edge_index`` sorted by receiver,
    ``w1 [R, K]``, ``w2 [3H, R]`` as in nn.Linear (see the module docstring)."""
    if v.shape[1] != 3 or phi.shape[1] != 3 * v.shape[2] or w2.shape[0] != phi.shape[1]:
        raise ValueError(
            f"painn_message: phi {tuple(phi.shape)}, v {tuple(v.shape)} and w2 "
            f"{tuple(w2.shape)} must be [N, 3H], [N, 3, H] and [3H, R]"
        )
    return PaiNNMessage.apply(phi, v, rbf, env, unit, edge_index, num_nodes, w1, b1, w2, b2, act)
