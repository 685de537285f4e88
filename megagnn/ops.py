"""The one switch between fused kernels and PyTorch references.

The references here are the specification: every fast path must match them. They are
twice differentiable, which conservative-force training needs (the force loss
differentiates a gradient).
"""

from __future__ import annotations

import torch


def segment_sum(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[k] = sum of src[e] over edges e with index[e] == k; empty segments give 0.

    ``src [E, ...]``, ``index [E]`` (any order, repeats allowed) -> ``[num_segments, ...]``.
    Low-precision inputs are accumulated in fp32 and cast back.
    """
    acc_dtype = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    out = src.new_zeros((num_segments, *src.shape[1:]), dtype=acc_dtype)
    return out.index_add(0, index, src.to(acc_dtype)).to(src.dtype)
