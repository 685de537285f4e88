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


def _shard(t: torch.Tensor, dim: int, chunks: int, group: Group) -> torch.Tensor:
    """This rank's piece of each of ``chunks`` equal parts of ``t`` along ``dim``."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if t.shape[dim] % (chunks * world):
        raise ValueError(
            f"cannot split {t.shape[dim]} channels into {chunks} x {world} tensor-parallel "
            "pieces; choose a hidden size divisible by the tensor-parallel size"
        )
    parts = [p.chunk(world, dim=dim)[rank] for p in t.chunk(chunks, dim=dim)]
    return torch.cat(parts, dim=dim).clone()


def is_sharded(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` holds only this rank's piece of the full one
    (column-parallel weight and bias, row-parallel weight; a row-parallel bias is replicated)."""
    if isinstance(module, ColumnParallelLinear):
        return True
    return isinstance(module, RowParallelLinear) and name == "weight"


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ + b with the rows of A (output channels) split: [..., in] -> [..., out/tp].

    ``chunks`` > 1 splits each of that many equal output blocks separately (e.g. PaiNN's
    three message parts), so every rank holds the same channels of each block.
    """

    def __init__(
        self, linear: nn.Linear, group: Group, chunks: int = 1, gather_output: bool = False
    ):
        super().__init__()
        self.group, self.chunks, self.gather_output = group, chunks, gather_output
        self.weight = nn.Parameter(_shard(linear.weight.detach(), 0, chunks, group))
        self.bias = (
            nn.Parameter(_shard(linear.bias.detach(), 0, chunks, group))
            if linear.bias is not None
            else None
        )
        self.partition_dim = 0  # of weight and bias, for checkpoint resharding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.group), self.weight, self.bias)
        return gather_from_region(y, self.group, self.chunks) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with the columns of A (input channels) split: [..., in/tp] -> [..., out].

    Partial products are summed by one all-reduce; the bias is added once, after it.
    ``split_output_chunks`` keeps only this rank's channels of the result (per chunk).
    """

    def __init__(self, linear: nn.Linear, group: Group, split_output_chunks: int | None = None):
        super().__init__()
        self.group, self.split_output_chunks = group, split_output_chunks
        self.weight = nn.Parameter(_shard(linear.weight.detach(), 1, 1, group))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.partition_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        if self.bias is not None:
            y = y + self.bias
        if self.split_output_chunks:
            y = split_to_region(y, self.group, self.split_output_chunks)
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
