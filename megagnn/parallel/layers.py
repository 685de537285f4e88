"""Column- and row-parallel linears, cut from a full ``nn.Linear`` so that every tensor-parallel
layout starts from the same weights as the single-device model.

With ``node_parallel`` they border a node-parallel region (atoms split over the group, as
Megatron's sequence parallelism splits tokens): a column-parallel linear all-gathers its
node-split input and a row-parallel one reduce-scatters its output over the nodes instead
of all-reducing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from megagnn.models.radial import RadialFilter
from megagnn.parallel.mappings import (
    Group,
    channels_to_nodes,
    copy_to_region,
    gather_from_region,
    gather_nodes_for_partials,
    reduce_from_region,
    reduce_scatter_to_nodes,
    split_to_region,
)


def shard(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous piece of ``t`` along ``dim``."""
    world = dist.get_world_size(group)
    if t.shape[dim] % world:
        raise ValueError(
            f"cannot split {t.shape[dim]} channels into {world} tensor-parallel pieces; "
            "choose a hidden size divisible by the tensor-parallel size"
        )
    return t.chunk(world, dim=dim)[dist.get_rank(group)].clone()


def is_sharded(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` holds only this rank's piece of the full one
    (column-parallel weight and bias, row-parallel weight; a row-parallel bias is replicated)."""
    if isinstance(module, ColumnParallelLinear):
        return True
    return isinstance(module, RowParallelLinear) and name == "weight"


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ + b with the rows of A (output channels) split: [..., in] -> [..., out/tp].

    ``gather_output`` returns all output channels: [N, out] (all-gather), or [N/tp, out]
    (all-to-all) when ``node_parallel``. With ``node_parallel`` the input is this rank's
    atoms [N/tp, in]; they are all-gathered for the product, and only the node-split input
    is kept for backward (the gather is repeated there, as Megatron does).
    """

    def __init__(
        self,
        linear: nn.Linear,
        group: Group,
        gather_output: bool = False,
        node_parallel: bool = False,
    ):
        super().__init__()
        self.group, self.gather_output, self.node_parallel = group, gather_output, node_parallel
        self.weight = nn.Parameter(shard(linear.weight.detach(), 0, group))
        self.bias = (
            nn.Parameter(shard(linear.bias.detach(), 0, group)) if linear.bias is not None else None
        )
        self.partition_dim = 0  # of weight and bias, for checkpoint resharding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.node_parallel:
            # rows of any leading shape as one [rows, C] matrix: IrrepNet's [N, 2l+1, C]
            # degree slices, given to the copy as they are, fixed the atom count of a
            # compiled trace (train.compile under tensor parallelism)
            flat = x.reshape(-1, x.shape[-1])
            y = F.linear(copy_to_region(flat, self.group), self.weight, self.bias)
            y = y.view(*x.shape[:-1], y.shape[-1])
            return gather_from_region(y, self.group) if self.gather_output else y
        # traced under torch.func (train.compile), Inductor decides what to keep; checkpoint's
        # saved-tensor hooks do not work there
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            # non-reentrant: second derivatives (force losses) pass through the recompute
            y = checkpoint(self._from_all_nodes, x, use_reentrant=False)
        else:
            y = self._from_all_nodes(x)
        return channels_to_nodes(y, self.group) if self.gather_output else y

    def _from_all_nodes(self, x: torch.Tensor) -> torch.Tensor:  # [N/tp, in] -> [N, out/tp]
        return F.linear(gather_nodes_for_partials(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with the columns of A (input channels) split: [..., in/tp] -> [..., out].

    Partial products are summed by one all-reduce; the bias is added once, after it.
    ``split_output`` keeps only this rank's channels of the result. With ``node_parallel``
    the sum is a reduce-scatter that leaves this rank's atoms [N/tp, out]; the bias then
    meets node-split rows, so its gradient is summed over the group (``copy_to_region``).
    """

    def __init__(
        self,
        linear: nn.Linear,
        group: Group,
        split_output: bool = False,
        node_parallel: bool = False,
    ):
        super().__init__()
        if split_output and node_parallel:
            raise ValueError("a row-parallel linear splits its output by channels or by nodes")
        self.group, self.split_output, self.node_parallel = group, split_output, node_parallel
        self.weight = nn.Parameter(shard(linear.weight.detach(), 1, group))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.partition_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.node_parallel:
            y = reduce_scatter_to_nodes(F.linear(x, self.weight), self.group)
            if self.bias is not None:
                y = y + copy_to_region(self.bias, self.group)
            return y
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        if self.bias is not None:
            y = y + self.bias
        if self.split_output:
            y = split_to_region(y, self.group)
        return y


class Boundary(nn.Module):
    """A tensor-parallel boundary, as a module that ``parallelize_tensor`` puts in place of an
    ``nn.Identity``: one of the mappings of ``megagnn.parallel.mappings`` (e.g.
    ``copy_to_region`` for replicated input of channel-split work, ``scatter_to_nodes`` into
    a node-parallel region)."""

    def __init__(self, mapping: Callable[[torch.Tensor, Group], torch.Tensor], group: Group):
        super().__init__()
        self.mapping, self.group = mapping, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x, self.group)


class ParallelRadialFilter(RadialFilter):
    """A ``RadialFilter`` with its last linear column-parallel: ``[E, K] -> [E, out/tp]``.

    The basis and the first layer stay replicated but feed channel-split work, so their
    gradients are summed over the group: the column-parallel linear does that for its own
    input, and ``fused_inputs`` does it for a fused kernel, which reads them directly."""

    def __init__(self, filt: RadialFilter, group: Group):
        first, activation, last = filt
        nn.Sequential.__init__(self, first, activation, ColumnParallelLinear(last, group))
        self.group = group

    def fused_inputs(self, rbf: torch.Tensor) -> tuple:
        rbf, w1, b1, w2, b2, activation = super().fused_inputs(rbf)
        rbf, w1, b1 = (copy_to_region(t, self.group) for t in (rbf, w1, b1))
        return rbf, w1, b1, w2, b2, activation
