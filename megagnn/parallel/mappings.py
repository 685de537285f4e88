"""Tensor-parallel communication as conjugate pairs of ops (the Megatron pattern).

Channel axis (last dim): copy <-> reduce and split <-> gather. Node axis (dim 0, for
node-parallel regions, Megatron's sequence parallelism with atoms as the sequence):
scatter <-> gather, gather-of-partials <-> reduce-scatter, and the two all-to-alls that turn
a node-split tensor into a channel-split one and back. Each is a few lines. Unlike
Megatron's, every backward is written with the conjugate *op*, not a raw collective,
so gradients of gradients flow through them: conservative-force training differentiates a
force (itself a gradient) and would otherwise get silently wrong weight gradients under
tensor parallelism. Each is a ``torch.library`` custom op (``megagnn::copy_to_region``, ...)
taking the process group by name, so a traced force function (``train.compile``) holds it as
one node whose derivative is its conjugate, where a traced collective would have none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

Group = dist.ProcessGroup | None


def _collective(name: str, old_name: str):
    """torch 2.13 renamed the single-tensor collectives; older releases have the old names.
    Looked up per call, so that profilers patching ``torch.distributed`` see them."""
    return getattr(dist, name, None) or getattr(dist, old_name)


def _world(group: Group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _node_chunks(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    world = _world(group)
    if x.shape[0] % world:
        raise ValueError(f"{x.shape[0]} nodes do not split into {world} equal pieces (pad them)")
    return list(x.chunk(world, dim=0))


def _all_gather_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * _world(group), *x.shape[1:]))
    _collective("all_gather_single", "all_gather_into_tensor")(out, x.contiguous(), group=group)
    return out


def _all_to_all(pieces: list[torch.Tensor], group: Group) -> list[torch.Tensor]:
    out = [torch.empty_like(p) for p in pieces]
    dist.all_to_all(out, [p.contiguous() for p in pieces], group=group)
    return out


def _mapping(name: str, doc: str, forward: Callable, shape: Callable) -> Callable:
    """A custom op ``megagnn::name(x, group_name)``: ``forward(x, group)`` on this rank, with
    ``shape(x, world)`` the output's shape for tracing (make_fx, torch.compile), which sees
    each mapping as one op whose backward is its conjugate."""

    @torch.library.custom_op(f"megagnn::{name}", mutates_args=())
    def op(x: torch.Tensor, group: str) -> torch.Tensor:
        return forward(x, _resolve_process_group(group))

    @op.register_fake
    def _(x, group):
        return x.new_empty(shape(x, dist.get_world_size(_resolve_process_group(group))))

    op.__doc__ = doc
    return op


# each op's conjugate: its derivative, and the op whose derivative it is
_CONJUGATE: dict[Callable, Callable] = {}


class _Mapping(torch.autograd.Function):
    """``op`` forward, its conjugate backward (whose backward is ``op`` again: twice
    differentiable). The ops carry the same rule (``_conjugates``) for a traced graph; this
    Function carries it where autograd meets the ops themselves, and it works under
    ``torch.func`` transforms (which a custom op's own autograd rule does not)."""

    @staticmethod
    def forward(x, op, group):
        return op(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.op, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        return _Mapping.apply(grad, _CONJUGATE[ctx.op], ctx.group), None, None


def _apply(op, x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _world(group) == 1 else _Mapping.apply(x, op, group.group_name)


def _conjugates(a, b) -> None:
    """``a``'s backward is ``b`` and ``b``'s is ``a``: ops, so twice differentiable."""

    def remember(ctx, inputs, output):
        ctx.group = inputs[1]

    a.register_autograd(lambda ctx, grad: (b(grad, ctx.group), None), setup_context=remember)
    b.register_autograd(lambda ctx, grad: (a(grad, ctx.group), None), setup_context=remember)
    _CONJUGATE.update({a: b, b: a})


def _reduce(x, group):
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def _gather_channels(x, group):
    pieces = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def _own_channels(x, group):
    own = x.chunk(_world(group), dim=-1)[dist.get_rank(group)]
    return own.clone(memory_format=torch.contiguous_format)


def _own_nodes(x, group):
    return _node_chunks(x, group)[dist.get_rank(group)].clone()


def _reduce_scatter_nodes(x, group):
    out = torch.empty_like(_node_chunks(x, group)[0])
    scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
    scatter(out, x.contiguous(), group=group)
    return out


def _channels_to_nodes(x, group):
    return torch.cat(_all_to_all(_node_chunks(x, group), group), dim=-1)


def _nodes_to_channels(x, group):
    return torch.cat(_all_to_all(list(x.chunk(_world(group), dim=-1)), group), dim=0)


def _same(x, w):
    return x.shape


def _channels_split(x, w):
    return (*x.shape[:-1], x.shape[-1] // w)


def _channels_gathered(x, w):
    return (*x.shape[:-1], x.shape[-1] * w)


def _nodes_split(x, w):
    return (x.shape[0] // w, *x.shape[1:])


def _nodes_gathered(x, w):
    return (x.shape[0] * w, *x.shape[1:])


_copy = _mapping(
    "copy_to_region", "Identity forward; backward all-reduces.", lambda x, g: x.clone(), _same
)
_reduce_op = _mapping(
    "reduce_from_region", "All-reduce (sum) forward; identity backward.", _reduce, _same
)
_split = _mapping(
    "split_to_region",
    "This rank's contiguous slice of the last dim; backward all-gathers.",
    _own_channels,
    _channels_split,
)
_gather = _mapping(
    "gather_from_region",
    "All-gather the slices of the last dim; backward keeps this rank's slice.",
    _gather_channels,
    _channels_gathered,
)
_scatter_nodes = _mapping(
    "scatter_to_nodes",
    "Replicated [N, ...] -> this rank's rows [N/tp, ...]; backward all-gathers.",
    _own_nodes,
    _nodes_split,
)
_gather_nodes = _mapping(
    "gather_from_nodes",
    "Rows [N/tp, ...] -> all rows [N, ...] for replicated work; backward keeps own rows.",
    _all_gather_nodes,
    _nodes_gathered,
)
_gather_partials = _mapping(
    "gather_nodes_for_partials",
    "Rows [N/tp, ...] -> all rows [N, ...] feeding rank-partial work (a column-parallel "
    "linear): each rank's gradient is one part of the total, so backward reduce-scatters.",
    _all_gather_nodes,
    _nodes_gathered,
)
_reduce_scatter = _mapping(
    "reduce_scatter_to_nodes",
    "Partial sums [N, ...] -> this rank's rows of the total [N/tp, ...]; backward "
    "all-gathers (the conjugate of gather_nodes_for_partials).",
    _reduce_scatter_nodes,
    _nodes_split,
)
_to_nodes = _mapping(
    "channels_to_nodes",
    "Channel-split [N, ..., C/tp] -> node-split [N/tp, ..., C] (one all-to-all).",
    _channels_to_nodes,
    lambda x, w: (x.shape[0] // w, *x.shape[1:-1], x.shape[-1] * w),
)
_to_channels = _mapping(
    "nodes_to_channels",
    "Node-split [N/tp, ..., C] -> channel-split [N, ..., C/tp] (one all-to-all).",
    _nodes_to_channels,
    lambda x, w: (x.shape[0] * w, *x.shape[1:-1], x.shape[-1] // w),
)
_conjugates(_copy, _reduce_op)
_conjugates(_split, _gather)
_conjugates(_scatter_nodes, _gather_nodes)
_conjugates(_gather_partials, _reduce_scatter)
_conjugates(_to_nodes, _to_channels)


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_copy, x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_reduce_op, x, group)


def split_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_split, x, group)


def gather_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_gather, x, group)


def scatter_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_scatter_nodes, x, group)


def gather_from_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_gather_nodes, x, group)


def gather_nodes_for_partials(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_gather_partials, x, group)


def reduce_scatter_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_reduce_scatter, x, group)


def channels_to_nodes(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_to_nodes, x, group)


def nodes_to_channels(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _apply(_to_channels, x, group)
