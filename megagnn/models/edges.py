"""What every interaction block reads about the neighbour graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagnn.ops import segment_sum


@dataclass
class Edges:
    """Edge geometry of a batch, computed once and shared by all blocks (and replicated over
    the tensor-parallel group)."""

    index: torch.Tensor  # [2, E] int64 (sender j, receiver i)
    rbf: torch.Tensor  # [E, K] radial basis of |r_ij|
    envelope: torch.Tensor  # [E] smooth cutoff u(|r_ij|)
    unit: torch.Tensor  # [E, 3] r_ij / |r_ij|
    inv_avg_neighbors: torch.Tensor  # [] 1 / mean neighbour count (message normalisation)
    num_nodes: int  # N
    receivers_sorted: bool = False  # index[1] non-decreasing (the kernels' CSR path)
    # the loss will differentiate the messages twice (conservative-force training): the
    # fused message kernels' double backward recomputes through the reference, so
    # kernels=auto keeps the reference for them
    differentiated_twice: bool = False

    @property
    def sender(self) -> torch.Tensor:  # [E]
        return self.index[0]

    @property
    def receiver(self) -> torch.Tensor:  # [E]
        return self.index[1]

    def aggregate(self, messages: torch.Tensor) -> torch.Tensor:
        """Σ over each node's incoming edges: [E, ...] -> [N, ...]."""
        return segment_sum(messages, self.receiver, self.num_nodes, self.receivers_sorted)


def sort_by_receiver(index: torch.Tensor, *per_edge: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``index [2, E]`` and per-edge tensors ordered by receiver, as the kernels' CSR path
    needs. A stable sort, so sorted edges keep their order (and the results their bits);
    always sorting (O(E), no device-to-host sync, nothing data-dependent for torch.export)
    costs less than checking on a GPU."""
    order = torch.sort(index[1], stable=True).indices
    return (index[:, order], *(t[order] for t in per_edge))
