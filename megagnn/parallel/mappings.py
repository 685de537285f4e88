"""Tensor-parallel communication as conjugate autograd Functions (the Megatron pattern).

copy <-> reduce and split <-> gather, each a few lines. Unlike Megatron's, every backward is
written with the conjugate *Function*, not a raw collective, so gradients of gradients flow
through them: conservative-force training differentiates a force (itself a gradient) and
would otherwise get silently wrong weight gradients under tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _world(group: Group) -> int:
    return dist.get_world_size(group) if group is not None else 1


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _ReduceFromRegion.apply(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _CopyToRegion.apply(grad, ctx.group), None


class _SplitToRegion(torch.autograd.Function):
    """Keep this rank's contiguous slice of the last dim; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(_world(group), dim=-1)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromRegion.apply(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather the slices of the last dim; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _SplitToRegion.apply(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceFromRegion.apply(x, group)


def split_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _SplitToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromRegion.apply(x, group)
