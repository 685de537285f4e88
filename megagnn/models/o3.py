"""The O(3) pieces of IrrepNet, from e3nn (well tested, and its harmonics are plain
polynomials that differentiate twice and export): the coupling paths, Clebsch-Gordan
coefficients in e3nn's real basis and spherical harmonics. Shared by the written-out
contraction (``irrep.couple``) and the cuequivariance one (``cueq.couple``)."""

from __future__ import annotations

import functools
import math

import torch


def paths(lmax: int) -> list[tuple[int, int, int]]:
    """(l1 feature, l2 harmonic, l3 output) products of natural parity, in a fixed order."""
    return [
        (l1, l2, l3)
        for l1 in range(lmax + 1)
        for l2 in range(lmax + 1)
        for l3 in range(abs(l1 - l2), min(l1 + l2, lmax) + 1)
        if (l1 + l2 + l3) % 2 == 0
    ]


@functools.lru_cache(maxsize=64)
def clebsch_gordan(l1: int, l2: int, l3: int) -> torch.Tensor:
    """Clebsch-Gordan coefficients [2l1+1, 2l2+1, 2l3+1] (e3nn's wigner_3j, real basis) in
    fp64 on the host, scaled so each output component has unit variance for unit-variance
    inputs. Computed once per path, outside any trace: the package sees constants."""
    from e3nn import o3

    with torch.device("cpu"):  # also when the model is built on the meta device
        return o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)


@functools.lru_cache(maxsize=8)
def path_couplings(lmax: int) -> tuple[torch.Tensor, ...]:
    """Per path of ``paths(lmax)``, the Clebsch-Gordan block [2l1+1, 2l2+1, 2l3+1] that
    IrrepNet's contraction applies: divided by sqrt(number of paths into l3), so each output
    degree keeps unit variance. fp64 on the host, computed outside any trace."""
    all_paths = paths(lmax)
    with torch.device("cpu"):
        return tuple(
            clebsch_gordan(l1, l2, l3) / math.sqrt(sum(q[2] == l3 for q in all_paths))
            for l1, l2, l3 in all_paths
        )


def spherical_harmonics(lmax: int, unit: torch.Tensor) -> torch.Tensor:
    """Y^l_m(r̂) for l <= lmax, [E, (lmax+1)²], component normalisation (|Y^l|² = 2l+1)."""
    from e3nn import o3

    return o3.spherical_harmonics(
        list(range(lmax + 1)), unit, normalize=False, normalization="component"
    )
