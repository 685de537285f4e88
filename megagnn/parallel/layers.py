"""Column- and row-parallel linears, cut from a full ``nn.Linear`` so that every tensor-parallel
layout starts from the same weights as the single-device model."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from megagnn.parallel.mappings import (
    Group,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
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
    """y = x Aᵀ + b with the rows of A (output channels) split: [..., in] -> [..., out/tp]."""

    def __init__(self, linear: nn.Linear, group: Group, gather_output: bool = False):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(shard(linear.weight.detach(), 0, group))
        self.bias = (
            nn.Parameter(shard(linear.bias.detach(), 0, group)) if linear.bias is not None else None
        )
        self.partition_dim = 0  # of weight and bias, for checkpoint resharding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.group), self.weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with the columns of A (input channels) split: [..., in/tp] -> [..., out].

    Partial products are summed by one all-reduce; the bias is added once, after it.
    ``split_output`` keeps only this rank's slice of the result.
    """

    def __init__(self, linear: nn.Linear, group: Group, split_output: bool = False):
        super().__init__()
        self.group, self.split_output = group, split_output
        self.weight = nn.Parameter(shard(linear.weight.detach(), 1, group))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.partition_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        if self.bias is not None:
            y = y + self.bias
        if self.split_output:
            y = split_to_region(y, self.group)
        return y


class ChannelMapping(nn.Module):
    """A tensor-parallel boundary inside a block, as a module that ``parallelize`` puts in
    place of an ``nn.Identity``: ``copy_to_region`` (replicated input of channel-split work),
    ``gather_from_region`` (channel-split -> full) or ``split_to_region`` (full -> split)."""

    def __init__(self, mapping: Callable[[torch.Tensor, Group], torch.Tensor], group: Group):
        super().__init__()
        self.mapping, self.group = mapping, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x, self.group)
