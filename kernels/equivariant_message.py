"""Fused PaiNN message (Schütt et al. 2021, eqs. 7-8) with the filter computed in-kernel:

    x_e  = φ(s)[j] ⊙ W(rbf_e) u_e                     [3H] per edge, parts (s, vv, vs)
    Δs_i = Σ_{e: j -> i} x_e^s
    Δv_i = Σ_{e: j -> i} v_j ⊙ x_e^vv + r̂_e x_e^vs     [3, H]

W is the radial MLP W2 act(W1 rbf + b1) + b2 with 3H outputs, channel-major (channel c,
part k at 3c + k) like φ(s), so a tensor-parallel rank's contiguous slice holds whole
channels. The kernel walks each receiver's edges (receiver-sorted, CSR): neither the
[E, 3H] filter and messages nor the [E, 3, H] vector messages are stored. Backward: two
kernels give the first derivatives as for the continuous-filter convolution (continuous_filter.py:
one pass over edge blocks with atomics at the senders, one over channel blocks and edge
splits for the filter weights); second derivatives recompute through the PyTorch
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    SILU,
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

__all__ = ["painn_message", "painn_message_reference"]


@triton.jit
def _part(
    hidden, w2_ptr, b2_ptr, phi_ptr, sender3, cols, col_ok, eh_ok, R,
    KPART: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """φ(s)[j] ⊙ W of one part (KPART: 0 = s, 1 = vv, 2 = vs) for a block of edges."""
    w2, b2 = load_last_rows(w2_ptr, b2_ptr, 3 * cols + KPART, col_ok, R, BLOCK_R, ACC)
    w = mm(hidden, tl.trans(w2), DOT) + b2[None, :]  # [BE, BH]
    phi = tl.load(phi_ptr + sender3[:, None] + 3 * cols[None, :] + KPART, mask=eh_ok, other=0)
    return w * phi.to(ACC)


@triton.jit
def _painn_kernel(
    phi_ptr, v_ptr, rbf_ptr, env_ptr, unit_ptr, sender_ptr, ptr_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, ds_ptr, dv_ptr,
    H, K, R,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    node, cols, col_ok, start, end = node_program(ptr_ptr, H, BLOCK_H)
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    ds = tl.zeros((BLOCK_H,), dtype=ACC)
    dvx = tl.zeros((BLOCK_H,), dtype=ACC)
    dvy = tl.zeros((BLOCK_H,), dtype=ACC)
    dvz = tl.zeros((BLOCK_H,), dtype=ACC)
    for first in range(start, end, BLOCK_E):  # this node's edges only
        rows = first + tl.arange(0, BLOCK_E)
        ok = rows < end
        rows64 = rows.to(tl.int64)
        eh_ok = ok[:, None] & col_ok[None, :]
        _, hidden = filter_hidden(
            rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT
        )
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)[:, None]
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        # the (small) filter rows are re-read per edge block from L1/L2 rather than held:
        # three [BH, BR] blocks would crowd the registers
        x_s = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 0,
                    BLOCK_R, ACC, DOT) * env  # fmt: skip
        x_vv = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 1,
                     BLOCK_R, ACC, DOT) * env  # fmt: skip
        x_vs = _part(hidden, w2_ptr, b2_ptr, phi_ptr, sender * 3 * H, cols, col_ok, eh_ok, R, 2,
                     BLOCK_R, ACC, DOT) * env  # fmt: skip
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


@triton.jit
def _part_grads(
    g_ptr, gv_ptr, v_ptr, ux, uy, uz, receiver, sender, cols, eh_ok, H, ACC: tl.constexpr
):
    """dL/dx of the three message parts of a block of edges ([BE, BH] each) and the
    vector gradient and values the vector part needs."""
    at_i = receiver[:, None] * 3 * H + cols[None, :]  # [i, 0, cols] of [N, 3, H]
    at_j = sender[:, None] * 3 * H + cols[None, :]
    gx = tl.load(gv_ptr + at_i, mask=eh_ok, other=0).to(ACC)
    gy = tl.load(gv_ptr + at_i + H, mask=eh_ok, other=0).to(ACC)
    gz = tl.load(gv_ptr + at_i + 2 * H, mask=eh_ok, other=0).to(ACC)
    vx = tl.load(v_ptr + at_j, mask=eh_ok, other=0).to(ACC)
    vy = tl.load(v_ptr + at_j + H, mask=eh_ok, other=0).to(ACC)
    vz = tl.load(v_ptr + at_j + 2 * H, mask=eh_ok, other=0).to(ACC)
    g_s = tl.load(g_ptr + receiver[:, None] * H + cols[None, :], mask=eh_ok, other=0).to(ACC)
    g_vv = gx * vx + gy * vy + gz * vz
    g_vs = gx * ux[:, None] + gy * uy[:, None] + gz * uz[:, None]
    return g_s, g_vv, g_vs, gx, gy, gz


@triton.jit
def _part_backward(
    g_x, hidden, w2_ptr, b2_ptr, phi_ptr, g_phi_ptr, sender, cols, col_ok, eh_ok, env, H, R,
    KPART: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Backward of one message part x_k = φ_k W_k u, given dL/dx_k [BE, BH]: adds dL/dφ_k at
    the senders; returns its dL/dhidden [BE, BR] and dL/du [BE] shares, and x_k."""
    w2, b2 = load_last_rows(w2_ptr, b2_ptr, 3 * cols + KPART, col_ok, R, BLOCK_R, ACC)
    w = mm(hidden, tl.trans(w2), DOT) + b2[None, :]  # [BE, BH]
    at = sender[:, None] * 3 * H + 3 * cols[None, :] + KPART
    phi = tl.load(phi_ptr + at, mask=eh_ok, other=0).to(ACC)
    tl.atomic_add(g_phi_ptr + at, g_x * w * env[:, None], mask=eh_ok)
    g_w = tl.where(eh_ok, g_x * phi * env[:, None], 0.0)  # dL/dW_k
    g_env = tl.sum(tl.where(eh_ok, g_x * phi * w, 0.0), axis=1)
    x = tl.where(eh_ok, phi * w * env[:, None], 0.0)
    return mm(g_w, w2, DOT), g_env, x


@triton.jit
def _painn_bwd_edges_kernel(
    g_ds_ptr, g_dv_ptr, phi_ptr, v_ptr, rbf_ptr, env_ptr, unit_ptr, sender_ptr, receiver_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    g_phi_ptr, g_v_ptr, g_pre_ptr, g_env_ptr, g_unit_ptr, g_rbf_ptr,
    E, H, K, R,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One block of edges, all channels: dL/dφ and dL/dv (atomics at the senders), and per
    edge dL/du, dL/dr̂, the filter's hidden and basis gradients."""
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = rows < E
    rows64 = rows.to(tl.int64)
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    pre, hidden = filter_hidden(rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT)
    env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)
    sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
    receiver = tl.load(receiver_ptr + rows64, mask=ok, other=0).to(tl.int64)
    ux = tl.load(unit_ptr + rows64 * 3, mask=ok, other=0).to(ACC)
    uy = tl.load(unit_ptr + rows64 * 3 + 1, mask=ok, other=0).to(ACC)
    uz = tl.load(unit_ptr + rows64 * 3 + 2, mask=ok, other=0).to(ACC)
    g_hidden = tl.zeros((BLOCK_E, BLOCK_R), dtype=ACC)
    g_env = tl.zeros((BLOCK_E,), dtype=ACC)
    g_ux = tl.zeros((BLOCK_E,), dtype=ACC)
    g_uy = tl.zeros((BLOCK_E,), dtype=ACC)
    g_uz = tl.zeros((BLOCK_E,), dtype=ACC)
    for c in range(0, H, BLOCK_H):
        cols = c + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        eh_ok = ok[:, None] & col_ok[None, :]
        g_s, g_vv, g_vs, gx, gy, gz = _part_grads(
            g_ds_ptr, g_dv_ptr, v_ptr, ux, uy, uz, receiver, sender, cols, eh_ok, H, ACC
        )
        g_h, g_u, _ = _part_backward(
            g_s, hidden, w2_ptr, b2_ptr, phi_ptr, g_phi_ptr, sender, cols, col_ok, eh_ok, env,
            H, R, 0, BLOCK_R, ACC, DOT,
        )  # fmt: skip
        g_hidden += g_h
        g_env += g_u
        g_h, g_u, x_vv = _part_backward(
            g_vv, hidden, w2_ptr, b2_ptr, phi_ptr, g_phi_ptr, sender, cols, col_ok, eh_ok, env,
            H, R, 1, BLOCK_R, ACC, DOT,
        )  # fmt: skip
        g_hidden += g_h
        g_env += g_u
        g_v_at = g_v_ptr + sender[:, None] * 3 * H + cols[None, :]  # the senders' vectors
        tl.atomic_add(g_v_at, gx * x_vv, mask=eh_ok)
        tl.atomic_add(g_v_at + H, gy * x_vv, mask=eh_ok)
        tl.atomic_add(g_v_at + 2 * H, gz * x_vv, mask=eh_ok)
        g_h, g_u, x_vs = _part_backward(
            g_vs, hidden, w2_ptr, b2_ptr, phi_ptr, g_phi_ptr, sender, cols, col_ok, eh_ok, env,
            H, R, 2, BLOCK_R, ACC, DOT,
        )  # fmt: skip
        g_hidden += g_h
        g_env += g_u
        g_ux += tl.sum(gx * x_vs, axis=1)  # x_vs multiplies the unit vector
        g_uy += tl.sum(gy * x_vs, axis=1)
        g_uz += tl.sum(gz * x_vs, axis=1)
    tl.store(g_env_ptr + rows64, g_env, mask=ok)
    tl.store(g_unit_ptr + rows64 * 3, g_ux, mask=ok)
    tl.store(g_unit_ptr + rows64 * 3 + 1, g_uy, mask=ok)
    tl.store(g_unit_ptr + rows64 * 3 + 2, g_uz, mask=ok)
    store_filter_grads(
        g_hidden, pre, w1, rows64, ok, g_pre_ptr, g_rbf_ptr, K, R, ACT, BLOCK_K, BLOCK_R, DOT
    )


@triton.jit
def _painn_bwd_weights_kernel(
    g_ds_ptr, g_dv_ptr, phi_ptr, v_ptr, rbf_ptr, env_ptr, unit_ptr, sender_ptr, receiver_ptr,
    w1_ptr, b1_ptr, g_w2_ptr, g_b2_ptr,
    E, H, K, R, edges_per_split,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One channel block over one split of the edges: its share of dL/dW2 and dL/db2 for
    the three parts (rows 3c + k), summed over splits afterwards."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    col_ok = cols < H
    w1, b1 = load_first_layer(w1_ptr, b1_ptr, K, R, BLOCK_K, BLOCK_R, ACC)
    acc_s = tl.zeros((BLOCK_H, BLOCK_R), dtype=ACC)
    acc_vv = tl.zeros((BLOCK_H, BLOCK_R), dtype=ACC)
    acc_vs = tl.zeros((BLOCK_H, BLOCK_R), dtype=ACC)
    b_s = tl.zeros((BLOCK_H,), dtype=ACC)
    b_vv = tl.zeros((BLOCK_H,), dtype=ACC)
    b_vs = tl.zeros((BLOCK_H,), dtype=ACC)
    for offset in range(0, edges_per_split, BLOCK_E):
        rows64, ok = split_rows(split, offset, edges_per_split, E, BLOCK_E)
        _, hidden = filter_hidden(
            rbf_ptr, rows64, ok, w1, b1, K, R, ACT, BLOCK_K, BLOCK_R, ACC, DOT
        )
        env = tl.load(env_ptr + rows64, mask=ok, other=0).to(ACC)[:, None]
        sender = tl.load(sender_ptr + rows64, mask=ok, other=0).to(tl.int64)
        receiver = tl.load(receiver_ptr + rows64, mask=ok, other=0).to(tl.int64)
        ux = tl.load(unit_ptr + rows64 * 3, mask=ok, other=0).to(ACC)
        uy = tl.load(unit_ptr + rows64 * 3 + 1, mask=ok, other=0).to(ACC)
        uz = tl.load(unit_ptr + rows64 * 3 + 2, mask=ok, other=0).to(ACC)
        eh_ok = ok[:, None] & col_ok[None, :]
        g_s, g_vv, g_vs, gx, gy, gz = _part_grads(
            g_ds_ptr, g_dv_ptr, v_ptr, ux, uy, uz, receiver, sender, cols, eh_ok, H, ACC
        )
        phi_at = phi_ptr + sender[:, None] * 3 * H + 3 * cols[None, :]
        gw = tl.where(eh_ok, g_s * tl.load(phi_at, mask=eh_ok, other=0).to(ACC) * env, 0.0)
        acc_s += mm(tl.trans(gw), hidden, DOT)
        b_s += tl.sum(gw, axis=0)
        gw = tl.where(eh_ok, g_vv * tl.load(phi_at + 1, mask=eh_ok, other=0).to(ACC) * env, 0.0)
        acc_vv += mm(tl.trans(gw), hidden, DOT)
        b_vv += tl.sum(gw, axis=0)
        gw = tl.where(eh_ok, g_vs * tl.load(phi_at + 2, mask=eh_ok, other=0).to(ACC) * env, 0.0)
        acc_vs += mm(tl.trans(gw), hidden, DOT)
        b_vs += tl.sum(gw, axis=0)
    base = split.to(tl.int64) * 3 * H
    store_weight_grads(g_w2_ptr, g_b2_ptr, base + 3 * cols, col_ok, acc_s, b_s, R, BLOCK_R)
    store_weight_grads(g_w2_ptr, g_b2_ptr, base + 3 * cols + 1, col_ok, acc_vv, b_vv, R, BLOCK_R)
    store_weight_grads(g_w2_ptr, g_b2_ptr, base + 3 * cols + 2, col_ok, acc_vs, b_vs, R, BLOCK_R)


def _painn_grads(g_ds, g_dv, phi, v, rbf, env, unit, edge_index, w1, b1, w2, b2, act):
    """First derivatives (φ, v, rbf, env, r̂, W1, b1, W2, b2) by the two backward kernels;
    no per-edge tensor wider than R or K is stored."""
    h = v.shape[2]
    like = (phi, v, rbf, env, unit, w1, b1, w2, b2)
    sender, receiver = (t.contiguous() for t in edge_index)
    tensors = (g_ds.contiguous(), g_dv.contiguous(), phi.contiguous(), v.contiguous())
    tensors += (rbf.contiguous(), env.contiguous(), unit.contiguous(), sender, receiver)
    tensors += (w1.contiguous(), b1.contiguous())

    def run(cfg: Config) -> tuple[torch.Tensor, ...]:
        grads = FilterGrads(rbf, w1, acc_dtype(phi.dtype), outputs=3 * h)
        g_phi, g_v, g_unit = grads.new(phi.shape), grads.new(v.shape), grads.new(unit.shape)
        if grads.edges and h:
            consts, edge_grid, weight_grid = grads.launch(h, act, cfg.block_h, cfg.block_e)
            _painn_bwd_edges_kernel[edge_grid](
                *tensors, w2.contiguous(), b2.contiguous(), g_phi, g_v, grads.g_pre,
                grads.g_env, g_unit, grads.g_rbf, **consts, **cfg.options(),
            )  # fmt: skip
            _painn_bwd_weights_kernel[weight_grid](
                *tensors, grads.g_w2, grads.g_b2, edges_per_split=grads.per_split, **consts
            )
        return cast_like((g_phi, g_v, grads.g_rbf, grads.g_env, g_unit, *grads.weights()), like)

    key = (phi.dtype, h, rbf.shape[1], w1.shape[0], size_class(rbf.shape[0]))
    return choose("painn_backward", key, run)


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
        if num_nodes == 0 or h == 0:
            return phi.new_empty((num_nodes, h)), phi.new_empty((num_nodes, 3, h))
        ptr = csr_pointers(edge_index[1], num_nodes)
        acc = tl.float64 if phi.dtype == torch.float64 else tl.float32

        def run(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
            ds = phi.new_empty((num_nodes, h))
            dv = phi.new_empty((num_nodes, 3, h))
            block_h = block(h, high=cfg.block_h)
            grid = (num_nodes, triton.cdiv(h, block_h))
            _painn_kernel[grid](
                phi.contiguous(), v.contiguous(), rbf.contiguous(), env.contiguous(),
                unit.contiguous(), edge_index[0].contiguous(), ptr,
                w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), ds, dv,
                h, rbf.shape[1], w1.shape[0],
                ACT=act, BLOCK_E=cfg.block_e, BLOCK_K=block(rbf.shape[1]),
                BLOCK_R=block(w1.shape[0]), BLOCK_H=block_h, ACC=acc,
                DOT=dot_code(acc_dtype(phi.dtype)), **cfg.options(),
            )  # fmt: skip
            return ds, dv

        key = (phi.dtype, h, rbf.shape[1], w1.shape[0], size_class(rbf.shape[0]))
        return choose("painn", key, run)

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

        def kernels(g_ds, g_dv, *inputs):
            return _painn_grads(g_ds, g_dv, *inputs[:5], edge_index, *inputs[5:], act)

        inputs = (phi, v, rbf, env, unit, w1, b1, w2, b2)
        grads = recompute_vjp(op, inputs, (g_ds, g_dv), first_order=kernels)
        g_phi, g_v, g_rbf, g_env, g_unit, *g_weights = grads
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
