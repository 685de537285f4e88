"""Materialise a model built on the meta device, one parameter at a time, on each rank.

Large models are built with ``device="meta"`` (no memory), cut by ``parallelize_tensor`` and
``PipelineStage`` (still no memory), then filled here: every parameter is drawn in full from
a generator seeded by (seed, its global name), with the default rule of the layer it came
from, and only this rank's slice is kept. So every tensor x pipeline layout starts from the
same weights, and a rank never holds more than its shard plus one full parameter.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import nn

from megagnn.parallel.layers import ColumnParallelLinear, RowParallelLinear, shard
from megagnn.parallel.pipeline import global_named_tensors


def _full_shape(module: nn.Module, name: str, local: torch.Size) -> tuple[tuple[int, ...], int]:
    """(shape in the unsharded model, dim split over tensor-parallel ranks or -1)."""
    if isinstance(module, ColumnParallelLinear):
        dim = 0
    elif isinstance(module, RowParallelLinear) and name == "weight":
        dim = 1
    else:
        return tuple(local), -1
    world = dist.get_world_size(module.group)
    shape = list(local)
    shape[dim] *= world
    return tuple(shape), dim


def _draw(module: nn.Module, name: str, shape: tuple[int, ...], g: torch.Generator):
    """The layer's default initialisation (torch's nn.Linear / nn.Embedding rules)."""
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=g)
    if not isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
        raise TypeError(f"no initialisation rule for parameters of {type(module).__name__}")
    # nn.Linear: kaiming_uniform(a=sqrt(5)) for the weight and U(±1/sqrt(fan_in)) for the
    # bias, which are the same bound; fan_in is the full input width
    fan_in = (
        shape[1]
        if name == "weight"
        else module.weight.shape[1]
        * (dist.get_world_size(module.group) if isinstance(module, RowParallelLinear) else 1)
    )
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


@torch.no_grad()
def materialize(
    model: nn.Module,
    seed: int,
    device: torch.device | str = "cpu",
    init_scale: dict[str, float] | None = None,
) -> nn.Module:
    """Replace every meta parameter of ``model`` (a Potential or a PipelineStage) with its
    initial values on ``device``, times ``init_scale[global name]`` where given (μP's output
    weights); buffers are recomputed by ``reset_buffers``."""
    init_scale = init_scale or {}
    for full_name, module, name, param, is_param in global_named_tensors(model):
        if not (is_param and param.is_meta):
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full_name.encode()))
        shape, dim = _full_shape(module, name, param.shape)
        value = _draw(module, name, shape, g) * init_scale.get(full_name, 1.0)
        if dim >= 0:
            value = shard(value, dim, module.group)
        setattr(module, name, nn.Parameter(value.to(device, param.dtype)))
    root = getattr(model, "model", model)
    for module in root.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.empty_like(buf, device=device))
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model
