"""Neighbour aggregation: out[k] = Σ_{e: index[e] = k} src[e].

Two kernels: for receiver-sorted (CSR) edges one program sums one node's contiguous edge
range (deterministic, no atomics); for any order, programs add their edges with atomics.
Both accumulate in fp32 for 16-bit inputs. The backward is a gather (grad_out[index]),
written with torch ops so that it is itself differentiable (force losses need that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import csr_pointers, node_program
from .reference import segment_sum_reference  # the specification
from .tuning import Config, choose, size_class

__all__ = ["segment_sum", "segment_sum_reference"]


@triton.jit
def _csr_sum_kernel(
    src_ptr,
    ptr_ptr,
    out_ptr,
    H,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    node, cols, col_ok, start, end = node_program(ptr_ptr, H, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=ACC)
    for first in range(start, end, BLOCK_E):  # this node's edges only
        rows = first + tl.arange(0, BLOCK_E)
        ok = (rows < end)[:, None] & col_ok[None, :]
        block = tl.load(src_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], mask=ok, other=0)
        acc += tl.sum(block.to(ACC), axis=0)
    tl.store(out_ptr + node.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _atomic_sum_kernel(
    src_ptr, index_ptr, out_ptr, E, H, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < E)[:, None] & (cols < H)[None, :]
    block = tl.load(src_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], mask=ok, other=0)
    target = tl.load(index_ptr + rows, mask=rows < E, other=0).to(tl.int64)
    # out is fp32 for 16-bit inputs, else the input dtype: add in out's precision
    value = block.to(out_ptr.dtype.element_ty)
    tl.atomic_add(out_ptr + target[:, None] * H + cols[None, :], value, mask=ok)


def _launch(
    src: torch.Tensor, index: torch.Tensor, num_segments: int, is_sorted: bool
) -> torch.Tensor:
    if src.numel() == 0 or num_segments == 0:
        return src.new_zeros((num_segments, *src.shape[1:]))
    flat = src.reshape(src.shape[0], -1).contiguous()  # [E, H]
    e, h = flat.shape
    acc_dtype = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    key = (src.dtype, h, size_class(e), size_class(num_segments))
    if is_sorted:
        ptr = csr_pointers(index, num_segments)  # [N + 1] CSR row pointers
        acc = tl.float64 if src.dtype == torch.float64 else tl.float32

        def csr(cfg: Config) -> torch.Tensor:
            out = torch.empty((num_segments, h), device=src.device, dtype=src.dtype)
            block_h = min(cfg.block_h, triton.next_power_of_2(h))
            grid = (num_segments, triton.cdiv(h, block_h))
            _csr_sum_kernel[grid](
                flat, ptr, out, h, BLOCK_E=cfg.block_e, BLOCK_H=block_h, ACC=acc,
                **cfg.options(),
            )  # fmt: skip
            return out

        out = choose("segment_sum_csr", key, csr)
    else:

        def atomic(cfg: Config) -> torch.Tensor:
            out = torch.zeros((num_segments, h), device=src.device, dtype=acc_dtype)
            block_h = min(cfg.block_h, triton.next_power_of_2(h))
            grid = (triton.cdiv(e, cfg.block_e), triton.cdiv(h, block_h))
            _atomic_sum_kernel[grid](
                flat, index, out, e, h, BLOCK_E=cfg.block_e, BLOCK_H=block_h, **cfg.options()
            )
            return out

        out = choose("segment_sum_atomic", key, atomic).to(src.dtype)
    return out.view(num_segments, *src.shape[1:])


class SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, num_segments, is_sorted):
        ctx.save_for_backward(index)
        return _launch(src, index, num_segments, is_sorted)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


def segment_sum(
    src: torch.Tensor, index: torch.Tensor, num_segments: int, is_sorted: bool | None = None
) -> torch.Tensor:
    """``src [E, ...]``, ``index [E]`` -> ``[num_segments, ...]``; empty segments give 0.

    ``is_sorted``: whether ``index`` is non-decreasing (checked when None); sorted indices
    take the deterministic path.
    """
    if index.dtype != torch.int64:
        index = index.long()
    if is_sorted is None:
        is_sorted = bool((index[1:] >= index[:-1]).all()) if index.numel() > 1 else True
    return SegmentSum.apply(src, index, num_segments, is_sorted)
