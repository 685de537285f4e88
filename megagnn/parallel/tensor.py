"""How each block splits its channels over the tensor-parallel group.

Blocks are written once for one device; this module swaps their linears for column/row
parallel ones and their boundary identities for gathers/splits. Per block (DESIGN.md):
column-parallel in, channel-local message and neighbour aggregation (no communication),
row-parallel out. Embedding, the small first radial layer and the energy readout stay
replicated.
"""

from __future__ import annotations

import torch.distributed as dist

from megagnn.models.painn import PaiNN
from megagnn.models.potential import DirectForceHead, Potential
from megagnn.models.schnet import SchNet
from megagnn.parallel.layers import (
    ChannelMapping,
    ColumnParallelLinear,
    RowParallelLinear,
)
from megagnn.parallel.mappings import (
    Group,
    copy_to_region,
    gather_from_region,
    split_to_region,
)


def _schnet(backbone: SchNet, group: Group) -> None:
    for block in backbone.blocks:
        block.in2f = ColumnParallelLinear(block.in2f, group)  # [N, H/tp]
        block.filter[2] = ColumnParallelLinear(block.filter[2], group)  # [E, H/tp]
        block.f2out[0] = RowParallelLinear(block.f2out[0], group)  # all-reduce -> [N, H]
        block.f2out[2] = ColumnParallelLinear(block.f2out[2], group, gather_output=True)


def _painn(backbone: PaiNN, group: Group) -> None:
    backbone.vector_channels = backbone.hidden // dist.get_world_size(group)
    for block in backbone.blocks:
        msg, upd = block.message, block.update
        msg.phi[0] = ColumnParallelLinear(msg.phi[0], group)  # [N, H/tp]
        msg.phi[2] = RowParallelLinear(msg.phi[2], group, split_output=True)  # [N, 3H/tp]
        msg.filter[2] = ColumnParallelLinear(msg.filter[2], group)  # [E, 3H/tp]
        msg.gather_ds = ChannelMapping(gather_from_region, group)  # Δs [N, H/tp] -> [N, H]
        upd.U = RowParallelLinear(upd.U, group)  # v [N, 3, H/tp] -> [N, 3, H]
        upd.V = RowParallelLinear(upd.V, group)
        upd.mlp[0] = ColumnParallelLinear(upd.mlp[0], group)  # [N, H/tp]
        upd.mlp[2] = RowParallelLinear(upd.mlp[2], group)  # all-reduce -> [N, 3H]
        upd.split_dv = ChannelMapping(split_to_region, group)  # Δv [N, 3, H] -> [N, 3, H/tp]


def _direct_forces(head: DirectForceHead, group: Group) -> None:
    head.node = ColumnParallelLinear(head.node, group)  # [N, H/tp]
    head.radial = ColumnParallelLinear(head.radial, group)  # [E, H/tp]
    head.out[1] = RowParallelLinear(head.out[1], group)  # all-reduce -> [E, 1]


def parallelize_tensor(model: Potential, group: Group) -> Potential:
    """Split ``model`` in place over ``group``; weights are cut from its current values."""
    if group is None:
        return model
    backbone = model.backbone
    if isinstance(backbone, SchNet):
        _schnet(backbone, group)
    elif isinstance(backbone, PaiNN):
        _painn(backbone, group)
    else:
        raise TypeError(f"no tensor-parallel plan for {type(backbone).__name__}")
    model.geometry_to_channels = ChannelMapping(copy_to_region, group)
    if model.force_head is not None:
        _direct_forces(model.force_head, group)
    return model
