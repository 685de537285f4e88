"""Radial basis and cutoff envelope of edge vectors, fused: vec [E, 3] -> rbf [E, K], u [E].

One pass reads each edge vector once and writes the basis and envelope; the backward kernel
turns their gradients into the edge-vector gradient with the analytic first derivatives
(∇_vec f(r) = f'(r) vec / r). The backward is itself differentiable, with analytic second
derivatives written in torch, because conservative-force training differentiates it again.

Bases (``kind``): Bessel  b_k = sqrt(2/c) sin(ω_k r) / r  (``params`` = ω_k);
Gaussian  g_k = exp(a (r - μ_k)^2)  (``params`` = μ_k, ``coeff`` = a < 0).
Envelope: the DimeNet polynomial u(d), d = r / c, zero for d >= 1.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .reference import polynomial_envelope
from .tuning import Config, choose, size_class

BESSEL, GAUSSIAN = 0, 1


@triton.jit
def _pow(x, P: tl.constexpr):
    out = tl.full(x.shape, 1.0, x.dtype)
    for _ in tl.static_range(P):
        out = out * x
    return out


@triton.jit
def _edge_lengths(vec_ptr, rows, E):
    ok = rows < E
    x = tl.load(vec_ptr + rows * 3, mask=ok, other=1.0)
    y = tl.load(vec_ptr + rows * 3 + 1, mask=ok, other=0.0)
    z = tl.load(vec_ptr + rows * 3 + 2, mask=ok, other=0.0)
    return x, y, z, tl.sqrt(x * x + y * y + z * z)


@triton.jit
def _basis(r, prm, KIND: tl.constexpr, pref, coeff):
    """Basis [BE, BK] and its first derivative in r, from r [BE, 1] and params [1, BK]."""
    if KIND == 0:
        s, c = tl.sin(prm * r), tl.cos(prm * r)
        return pref * s / r, pref * (prm * c * r - s) / (r * r)
    g = tl.exp(coeff * (r - prm) * (r - prm))
    return g, 2.0 * coeff * (r - prm) * g


@triton.jit
def _envelope(r, cutoff, P: tl.constexpr):
    """u(d) and du/dr for d = r / cutoff (zero beyond the cutoff)."""
    d = r / cutoff
    c1 = (P + 1) * (P + 2) / 2.0
    c2 = P * (P + 2) * 1.0
    c3 = P * (P + 1) / 2.0
    dp1 = _pow(d, P - 1)
    u = 1.0 - c1 * dp1 * d + c2 * dp1 * d * d - c3 * dp1 * d * d * d
    du = (-c1 * P + c2 * (P + 1) * d - c3 * (P + 2) * d * d) * dp1 / cutoff
    inside = d < 1.0
    return tl.where(inside, u, 0.0), tl.where(inside, du, 0.0)


@triton.jit
def _edge_block(
    vec_ptr, prm_ptr, const_ptr, E, K,
    KIND: tl.constexpr, P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """This program's edges: indices, vector, length, basis, envelope and r-derivatives.
    The constants (cutoff, sqrt(2/cutoff), Gaussian coefficient) come from a tensor in the
    edges' dtype: Python floats would reach compiled code as fp32, rounding an fp64 run."""
    cutoff, pref, coeff = tl.load(const_ptr), tl.load(const_ptr + 1), tl.load(const_ptr + 2)
    rows = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x, y, z, r = _edge_lengths(vec_ptr, rows, E)
    prm = tl.load(prm_ptr + ks, mask=ks < K, other=1.0)
    b, db = _basis(r[:, None], prm[None, :], KIND, pref, coeff)
    u, du = _envelope(r, cutoff, P)
    ok = (rows < E)[:, None] & (ks < K)[None, :]
    return rows, ks, ok, x, y, z, r, b, db, u, du


@triton.jit
def _radial_fwd_kernel(
    vec_ptr, prm_ptr, const_ptr, rbf_ptr, env_ptr, E, K,
    KIND: tl.constexpr, P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, ks, ok, x, y, z, r, b, db, u, du = _edge_block(
        vec_ptr, prm_ptr, const_ptr, E, K, KIND, P, BLOCK_E, BLOCK_K
    )
    tl.store(rbf_ptr + rows[:, None] * K + ks[None, :], b, mask=ok)
    tl.store(env_ptr + rows, u, mask=rows < E)


@triton.jit
def _radial_bwd_kernel(
    vec_ptr, prm_ptr, const_ptr, g_rbf_ptr, g_env_ptr, g_vec_ptr, E, K,
    KIND: tl.constexpr, P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, ks, ok, x, y, z, r, b, db, u, du = _edge_block(
        vec_ptr, prm_ptr, const_ptr, E, K, KIND, P, BLOCK_E, BLOCK_K
    )
    g = tl.load(g_rbf_ptr + rows[:, None] * K + ks[None, :], mask=ok, other=0.0)
    g_env = tl.load(g_env_ptr + rows, mask=rows < E, other=0.0)
    s = (tl.sum(g * db, axis=1) + g_env * du) / r  # dL/dr / r
    tl.store(g_vec_ptr + rows * 3, s * x, mask=rows < E)
    tl.store(g_vec_ptr + rows * 3 + 1, s * y, mask=rows < E)
    tl.store(g_vec_ptr + rows * 3 + 2, s * z, mask=rows < E)


@functools.lru_cache(maxsize=64)
def _constants(cutoff: float, coeff: float, dtype: torch.dtype, device: torch.device):
    """[cutoff, sqrt(2/cutoff), coeff] in the edges' dtype, made once per device (no copy to
    the GPU at every launch)."""
    values = [cutoff, math.sqrt(2.0 / cutoff), coeff]
    return torch.tensor(values, dtype=torch.float64, device=device).to(dtype)


def _launch(kernel, vec, params, kind, cutoff, p, coeff, *tensors):
    """Fills ``tensors`` (stores only: timing a configuration twice is harmless)."""
    e, k = vec.shape[0], params.numel()
    constants = _constants(float(cutoff), float(coeff), vec.dtype, vec.device)

    def run(cfg: Config) -> None:
        kernel[(triton.cdiv(e, cfg.block_e),)](
            vec, params, constants, *tensors, e, k,
            KIND=kind, P=p, BLOCK_E=cfg.block_e, BLOCK_K=triton.next_power_of_2(max(k, 1)),
            **cfg.options(),
        )  # fmt: skip

    choose("radial", (kernel.__name__, vec.dtype, kind, k, size_class(e)), run)


def _derivatives(r, params, kind, cutoff, p, coeff):
    """Torch: first and second r-derivatives of basis [E, K] and envelope [E]."""
    r_ = r.unsqueeze(-1)
    if kind == BESSEL:
        pref = math.sqrt(2.0 / cutoff)
        s, c = torch.sin(params * r_), torch.cos(params * r_)
        db = pref * (params * c * r_ - s) / r_**2
        d2b = pref * (-(params**2) * s / r_ - 2 * params * c / r_**2 + 2 * s / r_**3)
    else:
        g = torch.exp(coeff * (r_ - params) ** 2)
        db = 2 * coeff * (r_ - params) * g
        d2b = (2 * coeff + 4 * coeff**2 * (r_ - params) ** 2) * g
    d = r / cutoff
    c1, c2, c3 = (p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2
    du = (-c1 * p * d ** (p - 1) + c2 * (p + 1) * d**p - c3 * (p + 2) * d ** (p + 1)) / cutoff
    d2u = (
        -c1 * p * (p - 1) * d ** (p - 2)
        + c2 * (p + 1) * p * d ** (p - 1)
        - c3 * (p + 2) * (p + 1) * d**p
    ) / cutoff**2
    inside = d < 1
    return db, d2b, torch.where(inside, du, 0.0), torch.where(inside, d2u, 0.0)


class _RadialGrad(torch.autograd.Function):
    """(vec, dL/drbf, dL/du) -> dL/dvec by the backward kernel; its own backward in torch."""

    @staticmethod
    def forward(ctx, vec, g_rbf, g_env, params, kind, cutoff, p, coeff):
        ctx.save_for_backward(vec, g_rbf, g_env, params)
        ctx.consts = (kind, cutoff, p, coeff)
        g_vec = torch.empty_like(vec)
        _launch(_radial_bwd_kernel, vec, params, kind, cutoff, p, coeff, g_rbf, g_env, g_vec)
        return g_vec

    @staticmethod
    def backward(ctx, gg):
        vec, g_rbf, g_env, params = ctx.saved_tensors
        r = torch.linalg.vector_norm(vec, dim=-1)
        n = vec / r.unsqueeze(-1)  # [E, 3]
        db, d2b, du, d2u = _derivatives(r, params, *ctx.consts)
        n_gg = (n * gg).sum(-1)  # [E]
        s = (g_rbf * db).sum(-1) + g_env * du  # dL/dr
        ds = (g_rbf * d2b).sum(-1) + g_env * d2u
        grad_vec = (ds * n_gg).unsqueeze(-1) * n + (s / r).unsqueeze(-1) * (
            gg - n_gg.unsqueeze(-1) * n
        )
        return grad_vec, db * n_gg.unsqueeze(-1), du * n_gg, None, None, None, None, None


class RadialBasis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vec, params, kind, cutoff, p, coeff):
        ctx.save_for_backward(vec, params)
        ctx.consts = (kind, cutoff, p, coeff)
        e, k = vec.shape[0], params.numel()
        rbf = vec.new_empty((e, k))
        env = vec.new_empty((e,))
        if e:
            _launch(_radial_fwd_kernel, vec, params, kind, cutoff, p, coeff, rbf, env)
        return rbf, env

    @staticmethod
    def backward(ctx, g_rbf, g_env):
        vec, params = ctx.saved_tensors
        if vec.shape[0] == 0:
            return torch.zeros_like(vec), None, None, None, None, None
        e, k = vec.shape[0], params.numel()
        g_rbf = vec.new_zeros((e, k)) if g_rbf is None else g_rbf.contiguous()
        g_env = vec.new_zeros((e,)) if g_env is None else g_env.contiguous()
        g_vec = _RadialGrad.apply(vec, g_rbf, g_env, params, *ctx.consts)
        return g_vec, None, None, None, None, None


def radial_basis(
    vec: torch.Tensor, params: torch.Tensor, kind: int, cutoff: float, p: int, coeff: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis [E, K] and envelope [E] of edge vectors ``vec [E, 3]`` (see module docstring)."""
    vec = vec.contiguous()
    return RadialBasis.apply(vec, params.to(vec.dtype).contiguous(), kind, cutoff, p, coeff)


def radial_basis_reference(
    vec: torch.Tensor, params: torch.Tensor, kind: int, cutoff: float, p: int, coeff: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, in torch (differentiated by autograd)."""
    r = torch.linalg.vector_norm(vec, dim=-1)
    r_ = r.unsqueeze(-1)
    params = params.to(vec.dtype)
    if kind == BESSEL:
        rbf = math.sqrt(2.0 / cutoff) * torch.sin(params * r_) / r_
    else:
        rbf = torch.exp(coeff * (r_ - params) ** 2)
    return rbf, polynomial_envelope(r, cutoff, p)
