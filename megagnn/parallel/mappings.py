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


def _local_chunk_index(x: torch.Tensor, chunks: int, group: Group) -> list[torch.Tensor]:
    """Split the last dim into ``chunks`` equal parts, each into world-size pieces."""
    world, rank = _world(group), dist.get_rank(group)
    parts = x.chunk(chunks, dim=-1)
    return [p.chunk(world, dim=-1)[rank] for p in parts]


class _SplitToRegion(torch.autograd.Function):
    """Keep this rank's channels of the last dim (per chunk); backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group, chunks):
        ctx.group, ctx.chunks = group, chunks
        return torch.cat(_local_chunk_index(x, chunks, group), dim=-1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromRegion.apply(grad, ctx.group, ctx.chunks), None, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather the channels of the last dim (per chunk); backward keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, group, chunks):
        ctx.group, ctx.chunks = group, chunks
        world = _world(group)
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        per_rank = [p.chunk(chunks, dim=-1) for p in pieces]  # [rank][chunk]
        return torch.cat([per_rank[r][c] for c in range(chunks) for r in range(world)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _SplitToRegion.apply(grad, ctx.group, ctx.chunks), None, None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceFromRegion.apply(x, group)


def split_to_region(x: torch.Tensor, group: Group, chunks: int = 1) -> torch.Tensor:
    return x if _world(group) == 1 else _SplitToRegion.apply(x, group, chunks)


def gather_from_region(x: torch.Tensor, group: Group, chunks: int = 1) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromRegion.apply(x, group, chunks)
