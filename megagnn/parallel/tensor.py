"""How each block splits its channels over the tensor-parallel group.

Blocks are written once for one device; this module swaps their linears for column/row
parallel ones and their boundary identities for gathers/splits. Per block (DESIGN.md):
column-parallel in, channel-local message and neighbour aggregation (no communication),
row-parallel out. Embedding, the small first radial layer and the energy readout stay
replicated.

``node_parallel`` adds node-parallel regions (Megatron's sequence parallelism with atoms as
the sequence): the node state between blocks and the per-node work between a row-parallel
and the next column-parallel linear hold only this rank's N/tp atoms, so the replicated
[N, H] activations are divided by tp too. Messages and aggregation still see every atom on
the rank's channels; all-to-alls move Δs and Δv between the node and channel splits.

The boundary markers, every one an ``nn.Identity`` in the single-device model that a plan
here may replace with a ``Boundary``; no model has any other:
- ``Potential.geometry_to_channels``: replicated edge geometry entering channel-split work;
- ``<backbone>.split_nodes`` / ``<backbone>.gather_nodes`` (every family): into and out of a
  node-parallel region, around the blocks;
- ``IrrepBlock.gather_nodes``: node-split scalars that feed replicated per-atom work;
- ``PaiNNMessage.gather_ds`` / ``PaiNNUpdate.split_dv``: PaiNN's scalar update leaving, and
  its vector update entering, the channel split.

Everything else a plan writes into a model, and nothing more:
- ``nn.Linear`` -> ``ColumnParallelLinear`` / ``RowParallelLinear`` at the places each plan
  names (a Linear's parameters keep their names, so checkpoints load under any layout);
- ``RadialFilter`` -> ``ParallelRadialFilter`` (SchNet's and PaiNN's ``filter``): the one
  layer a fused kernel reads weights from, and which prepares them for it (``ops`` knows
  no process group);
- ``PaiNN.vector_channels``: the vector channels this rank holds, H/tp;
- ``Potential.node_multiple``: node-parallel runs pad the atoms to a multiple of tp.
"""

from __future__ import annotations

import torch.distributed as dist

from megagnn.models.egnn import EGNN
from megagnn.models.irrep import IrrepNet
from megagnn.models.painn import PaiNN
from megagnn.models.potential import DirectForceHead, Potential
from megagnn.models.schnet import SchNet
from megagnn.parallel.layers import (
    Boundary,
    ColumnParallelLinear,
    ParallelRadialFilter,
    RowParallelLinear,
)
from megagnn.parallel.mappings import (
    Group,
    channels_to_nodes,
    copy_to_region,
    gather_from_nodes,
    gather_from_region,
    nodes_to_channels,
    scatter_to_nodes,
    split_to_region,
)

# Shapes below: [N, H] replicated, [N/tp, H] node-split (node_parallel), [N, H/tp] channel-split


def _schnet(backbone: SchNet, group: Group, nodes: bool) -> None:
    for block in backbone.blocks:
        # h [N, H] or [N/tp, H] -> [N, H/tp]
        block.in2f = ColumnParallelLinear(block.in2f, group, node_parallel=nodes)
        block.filter = ParallelRadialFilter(block.filter, group)  # [E, H/tp]
        # all-reduce -> [N, H], or reduce-scatter -> [N/tp, H]
        block.f2out[0] = RowParallelLinear(block.f2out[0], group, node_parallel=nodes)
        # -> [N, H] (all-gather), or [N/tp, H] (all-gather nodes, all-to-all)
        block.f2out[2] = ColumnParallelLinear(
            block.f2out[2], group, gather_output=True, node_parallel=nodes
        )


def _painn(backbone: PaiNN, group: Group, nodes: bool) -> None:
    backbone.vector_channels = backbone.hidden // dist.get_world_size(group)
    for block in backbone.blocks:
        msg, upd = block.message, block.update
        if nodes:
            # s [N/tp, H] -> [N, H/tp] (all-gather) -> [N, 3H] (all-reduce) -> own 3H/tp
            msg.phi[0] = ColumnParallelLinear(msg.phi[0], group, node_parallel=True)
            msg.phi[2] = RowParallelLinear(msg.phi[2], group, split_output=True)
        else:
            # s [N, H]: phi's first layer replicated, its second column-split -> [N, 3H/tp]
            # with no collective (splitting both would all-reduce [N, 3H] only to slice it)
            msg.phi[2] = ColumnParallelLinear(msg.phi[2], group)
        msg.filter = ParallelRadialFilter(msg.filter, group)  # [E, 3H/tp]
        # Δs [N, H/tp] -> [N, H] (all-gather) or [N/tp, H] (all-to-all)
        msg.gather_ds = Boundary(channels_to_nodes if nodes else gather_from_region, group)
        # v [N, 3, H/tp] -> [N, 3, H] (all-reduce) or [N/tp, 3, H] (reduce-scatter)
        upd.U = RowParallelLinear(upd.U, group, node_parallel=nodes)
        upd.V = RowParallelLinear(upd.V, group, node_parallel=nodes)
        upd.mlp[0] = ColumnParallelLinear(upd.mlp[0], group, node_parallel=nodes)  # [N, H/tp]
        upd.mlp[2] = RowParallelLinear(upd.mlp[2], group, node_parallel=nodes)  # [N(/tp), 3H]
        # Δv [N, 3, H] -> [N, 3, H/tp] (keep own channels) or [N/tp, 3, H] -> (all-to-all)
        upd.split_dv = Boundary(nodes_to_channels if nodes else split_to_region, group)


def _egnn(backbone: EGNN, group: Group, nodes: bool) -> None:
    for block in backbone.blocks:
        # h [N, H] or [N/tp, H] (all-gather) -> A h, B h on own channels [N, 2H/tp]
        block.pair = ColumnParallelLinear(block.pair, group, node_parallel=nodes)
        block.radial[2] = ColumnParallelLinear(block.radial[2], group)  # [E, H/tp]
        # Σ_j σ(z_ij) [N, H/tp] -> m: all-reduce [N, H] or reduce-scatter [N/tp, H]
        block.message = RowParallelLinear(block.message, group, node_parallel=nodes)
        block.node[0] = ColumnParallelLinear(block.node[0], group, node_parallel=nodes)
        block.node[2] = RowParallelLinear(block.node[2], group, node_parallel=nodes)


def _irrep(backbone: IrrepNet, group: Group, nodes: bool) -> None:
    for block in backbone.blocks:
        # x [N, (L+1)², C] replicated, or [N/tp, (L+1)², C] (all-gathered per degree)
        # -> every degree's channels split [N, 2l+1, C/tp]
        for l, linear in enumerate(block.up.linears):
            block.up.linears[l] = ColumnParallelLinear(linear, group, node_parallel=nodes)
        block.radial[2] = ColumnParallelLinear(block.radial[2], group)  # [E, P C/tp]
        if block.product is not None:  # A ⊗ A's weights from replicated scalars [N, P C/tp]
            if nodes:  # scalars [N/tp, C] -> [N, C] (all-gather; the MLP's first layer is
                # replicated work, so backward keeps this rank's rows)
                block.gather_nodes = Boundary(gather_from_nodes, group)
            block.product[2] = ColumnParallelLinear(block.product[2], group)
        # the tensor product and the neighbour sum act on each rank's channels; then per
        # degree an all-reduce [N, 2l+1, C], or a reduce-scatter [N/tp, 2l+1, C] (scalars
        # with their gates: [N(/tp), 1, (L+1) C]); the gate and residual act on those rows
        for l, linear in enumerate(block.out.linears):
            block.out.linears[l] = RowParallelLinear(linear, group, node_parallel=nodes)


def _direct_forces(head: DirectForceHead, group: Group) -> None:
    head.node = ColumnParallelLinear(head.node, group)  # [N, H/tp]
    head.radial = ColumnParallelLinear(head.radial, group)  # [E, H/tp]
    head.out[1] = RowParallelLinear(head.out[1], group)  # all-reduce -> [E, 1]


def parallelize_tensor(model: Potential, group: Group, node_parallel: bool = False) -> Potential:
    """Split ``model`` in place over ``group``; weights are cut from its current values.
    ``node_parallel`` also splits the atoms between blocks (node-parallel regions)."""
    if group is None:
        return model
    backbone = model.backbone
    if isinstance(backbone, SchNet):
        _schnet(backbone, group, node_parallel)
    elif isinstance(backbone, PaiNN):
        _painn(backbone, group, node_parallel)
    elif isinstance(backbone, EGNN):
        _egnn(backbone, group, node_parallel)
    elif isinstance(backbone, IrrepNet):
        _irrep(backbone, group, node_parallel)
    else:
        raise TypeError(f"no tensor-parallel plan for {type(backbone).__name__}")
    if node_parallel:
        # atoms padded to a multiple of tp; embedding output split, readout input gathered
        model.node_multiple = dist.get_world_size(group)
        backbone.split_nodes = Boundary(scatter_to_nodes, group)
        backbone.gather_nodes = Boundary(gather_from_nodes, group)
    model.geometry_to_channels = Boundary(copy_to_region, group)
    if model.force_head is not None:
        _direct_forces(model.force_head, group)
    return model
