"""IrrepNet's channel-wise tensor products run by cuequivariance-torch (NVIDIA's library,
which MACE uses for its GPU speed-up): ``model.tensor_product=cueq``.

The products are handed to cuequivariance as segmented polynomials built here from the same
normalised Clebsch-Gordan blocks as ``irrep.couple`` (``o3.path_couplings``), not from its
own descriptors, so both give the same numbers (to rounding) and a model trained with one
runs with the other: the choice adds no weights. The layout is ours as it is: ``[B, (L+1)², C]``
flattened is cuequivariance's ``ir_mul`` order (components, then channels), and the path
weights ``[B, P, C]`` one segment per path. On CUDA with ``cuequivariance-ops-torch``
installed the product runs as its ``uniform_1d`` kernel, elsewhere as its plain-PyTorch
"naive" method (the one that runs on CPU, where the parity tests run it). Optional:
cuequivariance is imported only when a product runs here, and a config that asks for it
without the package installed is refused.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from megagnn.models.o3 import path_couplings, paths


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("cuequivariance_torch") is not None


@functools.cache
def has_cuda_ops() -> bool:
    return importlib.util.find_spec("cuequivariance_ops_torch") is not None


@functools.lru_cache(maxsize=8)
def coefficients(lmax: int) -> tuple[np.ndarray, ...]:
    """``o3.path_couplings`` as host arrays, the form cuequivariance takes. IrrepBlock asks
    for them when built: they must exist before any trace, where tensors have no data."""
    return tuple(c.numpy() for c in path_couplings(lmax))


def polynomial(lmax: int, channels: int, per_channel: bool):
    """Σ_p w_p ⊙ (x^{l1} ⊗ second^{l2})^{l3} as a cuequivariance polynomial with inputs
    (w [P·C], x [(L+1)²·C], second [(L+1)²] or [(L+1)²·C]) and output [(L+1)²·C]."""
    import cuequivariance as cue

    all_paths = paths(lmax)
    stp = cue.SegmentedTensorProduct.from_subscripts(
        "u,iu,ju,ku+ijk" if per_channel else "u,iu,j,ku+ijk"
    )
    for _ in all_paths:
        stp.add_segment(0, (channels,))
    for l in range(lmax + 1):
        stp.add_segment(1, (2 * l + 1, channels))
        stp.add_segment(2, (2 * l + 1, channels) if per_channel else (2 * l + 1,))
        stp.add_segment(3, (2 * l + 1, channels))
    for p, ((l1, l2, l3), c) in enumerate(zip(all_paths, coefficients(lmax), strict=True)):
        stp.add_path(p, l1, l2, l3, c=c)
    return cue.SegmentedPolynomial.eval_last_operand(stp)


@functools.lru_cache(maxsize=32)
def _module(lmax: int, channels: int, per_channel: bool, device: torch.device, dtype):
    import cuequivariance_torch as cuet
    from torch.utils._python_dispatch import _disable_current_modes

    method = "uniform_1d" if device.type == "cuda" and has_cuda_ops() else "naive"
    # built for real also when first asked for inside a trace (fake tensors): its
    # coefficients become constants of the graph
    with _disable_current_modes():
        module = cuet.SegmentedPolynomial(polynomial(lmax, channels, per_channel), method=method)
        return module.to(device=device, dtype=dtype)


def couple(
    x: torch.Tensor,
    w: torch.Tensor,
    second: torch.Tensor,
    lmax: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``irrep.couple`` by cuequivariance, its degrees concatenated: [B, (L+1)², C]. The
    gather ``x[index]`` happens inside the product (no [B, (L+1)², C] copy of x)."""
    channels = int(x.shape[-1])  # a weight's size: fixed, also where a trace makes it symbolic
    per_channel = second.dim() == 3
    module = _module(lmax, channels, per_channel, x.device, x.dtype)
    inputs = [w.flatten(1), x.flatten(1), second.flatten(1)]
    (out,) = module(inputs, input_indices=None if index is None else {1: index})
    return out.view(out.shape[0], (lmax + 1) ** 2, channels)
