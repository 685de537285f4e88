"""Data parallelism on any device: gradient averaging, the global gradient norm and an
optimizer whose state is sharded over data-parallel ranks.

Semantics follow megatron-core's DDP + DistributedOptimizer: each data-parallel rank computes
its batches' mean loss, gradients are averaged, and every rank keeps the AdamW moments of only
its share of the parameters (ZeRO stage 1), updates those and hands the new values to the
others. megatron-core's own classes require CUDA tensors, so this module builds the same
thing from torch (one flat all-reduce; ``ZeroRedundancyOptimizer``), which runs unchanged on
gloo and nccl.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from megagnn.parallel.layers import is_sharded
from megagnn.parallel.mappings import Group


def average_gradients(model: nn.Module, group: Group) -> None:
    """Average every parameter's gradient over ``group`` in one flat all-reduce."""
    if group is None:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(
    model: nn.Module, max_norm: float, tp_group: Group, pp_group: Group = None
) -> torch.Tensor:
    """Clip by the norm of the *full* gradient: tensor-parallel shards add up over the TP
    group, replicated parameters count once, pipeline stages (disjoint parameters) add up.
    Returns the norm before clipping."""
    sharded, replicated = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.grad is not None:
                (sharded if is_sharded(module, name) else replicated).append(p.grad)
    zero = next(model.parameters()).new_zeros((), dtype=torch.float64)
    sq_shard = sum((g.double().pow(2).sum() for g in sharded), zero)
    sq_rep = sum((g.double().pow(2).sum() for g in replicated), zero)
    if tp_group is not None:
        dist.all_reduce(sq_shard, group=tp_group)
    sq = sq_shard + sq_rep
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    norm = sq.sqrt()
    if math.isfinite(max_norm) and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in sharded + replicated:
            g.mul_(coef.to(g.dtype))
    return norm


def build_optimizer(
    params, lr: float, weight_decay: float, dp_group: Group, shard: bool = True
) -> torch.optim.Optimizer:
    """AdamW; with data parallelism and ``shard``, its state is split over ``dp_group``."""
    params = list(params)
    if dp_group is None or not shard:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    with warnings.catch_warnings():  # torch.distributed.optim scripts its functional optimizers
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(
        params,
        optimizer_class=torch.optim.AdamW,
        process_group=dp_group,
        lr=lr,
        weight_decay=weight_decay,
    )


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (its shard, under ZeRO)."""
    return getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer.optim


def owned_parameters(optimizer: torch.optim.Optimizer) -> set[torch.Tensor]:
    """Parameters whose optimizer state lives on this rank."""
    local = local_optimizer(optimizer)
    return {p for group in local.param_groups for p in group["params"]}
