"""Tensor-parallel communication as conjugate autograd Functions (the Megatron pattern).

Channel axis (last dim): copy <-> reduce and split <-> gather. Node axis (dim 0, for
node-parallel regions, Megatron's sequence parallelism with atoms as the sequence):
scatter <-> gather, gather-of-partials <-> reduce-scatter, and the two all-to-alls that turn
a node-split tensor into a channel-split one and back. Each is a few lines. Unlike
Megatron's, every backward is written with the conjugate *Function*, not a raw collective,
so gradients of gradients flow through them: conservative-force training differentiates a
force (itself a gradient) and would otherwise get silently wrong weight gradients under
tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _collective(name: str, old_name: str):
    """torch 2.13 renamed the single-tensor collectives; older releases have the old names.
    Looked up per call, so that profilers patching ``torch.distributed`` see them."""
    return getattr(dist, name, None) or getattr(dist, old_name)


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


def _node_chunks(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    world = _world(group)
    if x.shape[0] % world:
        raise ValueError(f"{x.shape[0]} nodes do not split into {world} equal pieces (pad them)")
    return list(x.chunk(world, dim=0))


def _all_gather_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * _world(group), *x.shape[1:]))
    _collective("all_gather_single", "all_gather_into_tensor")(out, x.contiguous(), group=group)
    return out


class _ScatterToNodes(torch.autograd.Function):
    """Replicated [N, ...] -> this rank's rows [N/tp, ...]; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _node_chunks(x, group)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromNodes.apply(grad, ctx.group), None


class _GatherFromNodes(torch.autograd.Function):
    """Rows [N/tp, ...] -> all rows [N, ...] for replicated work; backward keeps own rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_nodes(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _ScatterToNodes.apply(grad, ctx.group), None


class _GatherNodesForPartials(torch.autograd.Function):
    """Rows [N/tp, ...] -> all rows [N, ...] feeding rank-partial work (a column-parallel
    linear): each rank's gradient is one part of the total, so backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_nodes(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatterToNodes.apply(grad, ctx.group), None


class _ReduceScatterToNodes(torch.autograd.Function):
    """Partial sums [N, ...] -> this rank's rows of the total [N/tp, ...]; backward
    all-gathers (the conjugate of ``_GatherNodesForPartials``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        chunks = _node_chunks(x, group)
        out = torch.empty_like(chunks[0])
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(
            out, x.contiguous(), group=group
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        return _GatherNodesForPartials.apply(grad, ctx.group), None


def _all_to_all(pieces: list[torch.Tensor], group: Group) -> list[torch.Tensor]:
    out = [torch.empty_like(p) for p in pieces]
    dist.all_to_all(out, [p.contiguous() for p in pieces], group=group)
    return out


class _ChannelsToNodes(torch.autograd.Function):
    """Channel-split [N, ..., C/tp] -> node-split [N/tp, ..., C] (one all-to-all)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return torch.cat(_all_to_all(_node_chunks(x, group), group), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _NodesToChannels.apply(grad, ctx.group), None


class _NodesToChannels(torch.autograd.Function):
    """Node-split [N/tp, ..., C] -> channel-split [N, ..., C/tp] (one all-to-all)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return torch.cat(_all_to_all(list(x.chunk(_world(group), dim=-1)), group), dim=0)

    @staticmethod
    def backward(ctx, grad):
        return _ChannelsToNodes.apply(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceFromRegion.apply(x, group)


def split_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _SplitToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ScatterToNodes.apply(x, group)


def gather_from_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromNodes.apply(x, group)


def gather_nodes_for_partials(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherNodesForPartials.apply(x, group)


def reduce_scatter_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceScatterToNodes.apply(x, group)


def channels_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _ChannelsToNodes.apply(x, group)


def nodes_to_channels(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _NodesToChannels.apply(x, group)
