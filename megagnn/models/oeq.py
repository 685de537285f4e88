"""IrrepNet's edge tensor product run by OpenEquivariance (CUDA kernels generated for the
problem, with forward, backward and double backward): ``model.tensor_product=oeq``.

OpenEquivariance takes e3nn's description of a tensor product and returns what e3nn's
``o3.TensorProduct`` would; for "uvu" products whose second input has multiplicity one (the
edge harmonics) the numbers and the weight order are e3nn's. So the product is written here
once as that description (``spec``): feature irreps ``C x l`` (natural parity), harmonics
``1 x l``, one weighted "uvu" instruction per path of ``o3.paths`` in that order, no
normalisation of e3nn's own and a path weight that gives each path IrrepNet's coefficient
(``o3.path_couplings``: e3nn's wigner_3j times sqrt((2 l3 + 1) / paths into l3), and e3nn
scales a path by the square root of its weight). The parity tests run the description with
e3nn on CPU against ``irrep.couple``; on CUDA the same description is handed to
OpenEquivariance. Only the edge product goes this way: A ⊗ A couples channel by channel
("uuu"), which the kernels do not cover, and stays with ``irrep.couple``.

Layouts: IrrepNet keeps ``[B, (L+1)², C]`` (components, then channels); e3nn's ``mul_ir``
wants each degree as ``[C, 2l+1]``. The conversion is a transpose per degree on each side.
The path weights ``[B, P, C]`` flattened are e3nn's per-instruction weights in order.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from megagnn.models.o3 import path_couplings, paths


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("openequivariance") is not None


def _irrep(l: int) -> str:
    return f"{l}{'eo'[l % 2]}"  # natural parity: even l even, odd l odd


def spec(lmax: int, channels: int) -> dict:
    """The edge product as e3nn's ``o3.TensorProduct`` arguments (which OpenEquivariance's
    ``TPProblem`` takes as they are): x [C x l], harmonics [1 x l] -> [C x l], per-edge
    weights."""
    # e3nn multiplies a path by sqrt(path_weight) x wigner_3j(l1, l2, l3), and its wigner_3j
    # has unit norm: IrrepNet's block (a multiple of it) has norm sqrt(path_weight)
    instructions = [
        (l1, l2, l3, "uvu", True, float(block.square().sum()))
        for (l1, l2, l3), block in zip(paths(lmax), path_couplings(lmax), strict=True)
    ]
    return dict(
        irreps_in1="+".join(f"{channels}x{_irrep(l)}" for l in range(lmax + 1)),
        irreps_in2="+".join(f"1x{_irrep(l)}" for l in range(lmax + 1)),
        irreps_out="+".join(f"{channels}x{_irrep(l)}" for l in range(lmax + 1)),
        instructions=instructions,
        irrep_normalization="none",
        path_normalization="none",
        shared_weights=False,
        internal_weights=False,
    )


def to_mul_ir(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """[B, (L+1)², C] -> [B, Σ_l C (2l+1)], each degree as [C, 2l+1]."""
    return torch.cat(
        [x[:, l * l : (l + 1) ** 2].transpose(1, 2).flatten(1) for l in range(lmax + 1)], 1
    )


def from_mul_ir(z: torch.Tensor, lmax: int, channels: int) -> torch.Tensor:
    """The inverse of ``to_mul_ir``: [B, Σ_l C (2l+1)] -> [B, (L+1)², C]."""
    blocks = z.split([channels * (2 * l + 1) for l in range(lmax + 1)], 1)
    return torch.cat(
        [b.view(-1, channels, 2 * l + 1).transpose(1, 2) for l, b in enumerate(blocks)], 1
    )


@functools.lru_cache(maxsize=32)
def product(lmax: int, channels: int, dtype: torch.dtype, device: torch.device):
    """OpenEquivariance's module for ``spec(lmax, channels)`` in ``dtype`` (its kernels are
    generated and compiled when first built)."""
    if device.type != "cuda":
        raise RuntimeError(
            "model.tensor_product=oeq runs on CUDA only; use model.tensor_product=e3nn "
            "(the same numbers) on this device"
        )
    import numpy as np
    import openequivariance as oeq

    precision = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    problem = oeq.TPProblem(**spec(lmax, channels), irrep_dtype=precision, weight_dtype=precision)
    return oeq.TensorProduct(problem, torch_op=True)


def couple(
    x: torch.Tensor,
    w: torch.Tensor,
    second: torch.Tensor,
    lmax: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``irrep.couple`` for edge harmonics ``second [B, (L+1)²]`` by ``product`` (any module
    with e3nn's ``(x, y, weights)`` call for ``spec``), its degrees concatenated:
    [B, (L+1)², C]. The rows ``index`` are gathered after the layout change, so x is
    transposed once per atom, not once per edge."""
    if second.dim() != 2:
        raise ValueError("the OpenEquivariance product takes edge harmonics [B, (L+1)²] only")
    channels = int(x.shape[-1])
    z = to_mul_ir(x, lmax)
    z = z if index is None else z[index]
    out = product(lmax, channels, x.dtype, x.device)(z, second, w.flatten(1))
    return from_mul_ir(out, lmax, channels)
