"""The one switch between fused Triton kernels and their PyTorch references.

``auto`` (default): Triton kernels for CUDA tensors when triton is installed, the references
otherwise. ``triton`` forces the kernels (on CPU they need ``TRITON_INTERPRET=1`` set before
import: tests), ``torch`` forces the references. The references are the specification every
kernel must match; all paths are twice differentiable (force losses differentiate a
gradient).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator

import torch
from torch import nn

from megagnn.kernels.reference import polynomial_envelope, segment_sum_reference

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
_deterministic = False
_for_compiler = False
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: use one of {BACKENDS}")
    if name == "triton" and not _HAVE_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package: pip install triton")
    _backend = name


def set_dot_precision(name: str) -> None:
    """How the fused kernels' filter MLP multiplies fp32 values: 'ieee' (exact), 'tf32' or
    'bf16' (tensor cores; ``megagnn.kernels.common.DOT_PRECISIONS``)."""
    if name == "ieee" and "megagnn.kernels.common" not in sys.modules:
        return  # the kernels' default: nothing to load
    if not _HAVE_TRITON:
        raise RuntimeError(f"dot precision {name!r} is for the triton kernels: pip install triton")
    from megagnn.kernels.common import set_dot_precision as set_kernels

    set_kernels(name)


def set_autotune(flag: bool) -> None:
    """Let each kernel time its launch configurations on the GPU at the first launch of a
    shape class and keep the fastest (``megagnn.kernels.tuning``); off: the defaults."""
    if not flag and "megagnn.kernels.tuning" not in sys.modules:
        return  # the kernels' default: nothing to load
    if not _HAVE_TRITON:
        raise RuntimeError("kernel autotuning is for the triton kernels: pip install triton")
    from megagnn.kernels.tuning import set_autotune as set_kernels

    set_kernels(flag)


def set_deterministic(flag: bool) -> None:
    """Use no kernel whose result depends on the order of atomic additions."""
    global _deterministic
    _deterministic = flag


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def tracing_for_compiler() -> Iterator[None]:
    """Trace the PyTorch references as a graph for Inductor to generate kernels from, in
    the form a compiler fuses (``fusable``): a contraction written as one broadcast product
    and sum becomes a loop that never stores the product, where eager code would."""
    global _for_compiler
    previous = _for_compiler
    _for_compiler = True
    try:
        with use_backend("torch"):
            yield
    finally:
        _for_compiler = previous


def fusable() -> bool:
    """Whether the graph being traced goes to a compiler (``tracing_for_compiler``)."""
    return _for_compiler


def _triton(t: torch.Tensor) -> bool:
    if _backend == "auto":
        return t.is_cuda and _HAVE_TRITON
    return _backend == "triton"


def _fused(t: torch.Tensor, edges) -> bool:
    """Whether a fused message kernel serves these edges. Its second derivative recomputes
    through the reference after an extra forward, so under ``auto`` a message the loss
    differentiates twice (conservative-force training) takes the reference: never slower
    than plain torch. ``triton`` forces the kernel (its double backward is still exact).
    Their backward adds at the senders with atomics: deterministic runs take the reference."""
    if not edges.receivers_sorted or _deterministic:
        return False
    if _backend == "auto" and edges.differentiated_twice:
        return False
    return _triton(t)


def segment_sum(
    src: torch.Tensor, index: torch.Tensor, num_segments: int, is_sorted: bool | None = None
) -> torch.Tensor:
    """out[k] = sum of src[e] over edges e with index[e] == k; empty segments give 0.

    ``src [E, ...]``, ``index [E]`` (any order, repeats allowed) -> ``[num_segments, ...]``.
    Low-precision inputs are accumulated in fp32 and cast back. ``is_sorted`` (index
    non-decreasing) lets the kernel take its deterministic path without checking.
    A count of one given as a Python int (a one-structure batch; in a package's trace, where
    structure counts are otherwise symbolic, its single structure) is a plain sum: Inductor's
    threaded CPU code cannot vectorise a scatter whose target index is constant.
    """
    if type(num_segments) is int and num_segments == 1:
        return src.sum(0, keepdim=True)
    if _triton(src) and (is_sorted or not _deterministic):  # unsorted: atomics
        from megagnn.kernels.aggregate import segment_sum as kernel

        return kernel(src, index, num_segments, is_sorted)
    return segment_sum_reference(src, index, num_segments)


def radial_basis(
    vec: torch.Tensor, r: torch.Tensor, basis: nn.Module, cutoff: float, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial basis [E, K] and cutoff envelope [E] of edges ``vec [E, 3]`` (lengths ``r``)."""
    if _triton(vec):
        from megagnn.kernels.radial import radial_basis as kernel

        kind, params, coeff = basis.kernel_args()
        return kernel(vec, params, kind, cutoff, p, coeff)
    return basis(r), polynomial_envelope(r, cutoff, p)


def _fused_filter(filter_mlp: nn.Module, edges) -> tuple:
    """(rbf, W1, b1, W2, b2, activation kind) for the fused kernels, as ``filter_mlp`` (a
    ``megagnn.models.radial.RadialFilter``, or the parallel one a plan swaps in) prepares
    them."""
    from megagnn.kernels.common import SILU, SSP

    rbf, w1, b1, w2, b2, act = filter_mlp.fused_inputs(edges.rbf)
    return rbf, w1, b1, w2, b2, SILU if isinstance(act, nn.SiLU) else SSP


def cfconv(x: torch.Tensor, edges, filter_mlp: nn.Module) -> torch.Tensor:
    """Continuous-filter convolution Σ_{j->i} filter(rbf_ij) u_ij ⊙ x_j -> [N, H/tp].

    ``filter_mlp`` is Linear(K, R) -> activation -> Linear(R, H) (the last one possibly
    column-parallel). The Triton path never stores the [E, H] filter or messages.
    """
    if not _fused(x, edges):
        w = filter_mlp(edges.rbf) * edges.envelope.unsqueeze(-1)  # [E, H/tp]
        return edges.aggregate(x[edges.sender] * w)
    from megagnn.kernels.continuous_filter import cfconv as kernel

    rbf, w1, b1, w2, b2, kind = _fused_filter(filter_mlp, edges)
    return kernel(x, rbf, edges.envelope, edges.local_index, edges.num_nodes, w1, b1, w2, b2, kind)


def painn_message(
    phi: torch.Tensor, v: torch.Tensor, edges, filter_mlp: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """PaiNN's Σ_j φ_j ⊙ W_ij split into (Δs [N, H/tp], Δv [N, 3, H/tp]) (eqs. 7-8).

    ``phi [N, 3H/tp]`` and the filter's 3H/tp outputs are channel-major (channel c, part k
    at 3c + k); ``v [N, 3, H/tp]``. The Triton path never stores a per-edge tensor.
    """
    if not _fused(phi, edges):
        w = filter_mlp(edges.rbf) * edges.envelope.unsqueeze(-1)  # [E, 3H/tp]
        x = phi[edges.sender] * w  # [E, 3H/tp]
        x_s, x_vv, x_vs = x.unflatten(-1, (-1, 3)).unbind(-1)  # [E, H/tp] each
        unit = edges.unit.to(x_vs.dtype).unsqueeze(-1)  # [E, 3, 1]
        v_msg = v[edges.sender] * x_vv.unsqueeze(1) + unit * x_vs.unsqueeze(1)  # [E, 3, H/tp]
        return edges.aggregate(x_s), edges.aggregate(v_msg)
    from megagnn.kernels.equivariant_message import painn_message as kernel

    rbf, w1, b1, w2, b2, kind = _fused_filter(filter_mlp, edges)
    args = (edges.envelope, edges.unit, edges.local_index, edges.num_nodes, w1, b1, w2, b2, kind)
    return kernel(phi, v, rbf, *args)
