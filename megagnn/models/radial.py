"""Radial bases of edge lengths (computed in fp32 or fp64).

The cutoff envelope is ``megagnn.ops.polynomial_envelope`` (it lives with the kernels).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/c) sin(n π r / c) / r, n = 1..K (DimeNet, Gasteiger et al. 2020, eq. 7)."""

    def __init__(self, cutoff: float, num: int):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freqs", torch.empty(num))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        n = self.freqs.numel()
        self.freqs.copy_(torch.arange(1, n + 1) * math.pi / self.cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E, K]
        r = r.unsqueeze(-1)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freqs.to(r.dtype) * r) / r

    def kernel_args(self) -> tuple[int, torch.Tensor, float]:
        return 0, self.freqs, 0.0  # the fused kernel's (kind, params, coeff)


class GaussianBasis(nn.Module):
    """exp(-(r - μ_k)^2 / (2 σ^2)) with centres μ_k evenly spaced on [0, c] (SchNet eq. 4)."""

    def __init__(self, cutoff: float, num: int):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("centers", torch.empty(num))
        self.coeff = -0.5 / (cutoff / max(num - 1, 1)) ** 2
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.centers.copy_(torch.linspace(0.0, self.cutoff, self.centers.numel()))

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E, K]
        return torch.exp(self.coeff * (r.unsqueeze(-1) - self.centers.to(r.dtype)) ** 2)

    def kernel_args(self) -> tuple[int, torch.Tensor, float]:
        return 1, self.centers, self.coeff  # the fused kernel's (kind, params, coeff)


class RadialFilter(nn.Sequential):
    """Per-edge filter weights from the radial basis: Linear(K, R) -> activation ->
    Linear(R, out), ``[E, K] -> [E, out]`` (``[E, out/tp]`` once a tensor-parallel plan
    splits its last layer).

    A fused kernel computes the filter itself, never storing ``[E, out]``: ``fused_inputs``
    gives it the basis and weights as this layer would use them."""

    def __init__(self, num_rbf: int, hidden: int, out: int, activation: nn.Module):
        super().__init__(nn.Linear(num_rbf, hidden), activation, nn.Linear(hidden, out))

    def fused_inputs(self, rbf: torch.Tensor) -> tuple:
        """(rbf [E, K], W1, b1, W2, b2, activation module) for a fused filter kernel."""
        first, activation, last = self
        return rbf, first.weight, first.bias, last.weight, last.bias, activation


def make_basis(kind: str, cutoff: float, num: int) -> nn.Module:
    return {"bessel": BesselBasis, "gaussian": GaussianBasis}[kind](cutoff, num)
