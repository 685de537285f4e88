"""The specifications the kernels are tested against, in plain torch (no triton needed).

``megagnn.ops`` uses these on CPU and wherever a kernel does not apply; the models reach
them only through ``megagnn.ops``.
"""

from __future__ import annotations

import torch


def segment_sum_reference(
    src: torch.Tensor, index: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """out[k] = Σ_{e: index[e] = k} src[e]: index_add, accumulated in fp32 for 16-bit inputs."""
    acc_dtype = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    out = src.new_zeros((num_segments, *src.shape[1:]), dtype=acc_dtype)
    return out.index_add(0, index, src.to(acc_dtype)).to(src.dtype)


def polynomial_envelope(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """Smooth cutoff u(d), d = r/c, zero with p continuous derivatives at d = 1 (DimeNet eq. 8).

    u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2) for d < 1, else 0.
    """
    d = r / cutoff
    u = (
        1.0
        - (p + 1) * (p + 2) / 2 * d**p
        + p * (p + 2) * d ** (p + 1)
        - p * (p + 1) / 2 * d ** (p + 2)
    )
    return torch.where(d < 1.0, u, torch.zeros_like(u))
