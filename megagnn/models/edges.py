"""What every interaction block reads about the neighbour graph."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from megagnn.ops import segment_sum


@dataclass
class Edges:
    """Edge geometry of a batch, computed once and shared by all blocks (and replicated over
    the tensor-parallel group).

    Blocks reach the edges through ``map(fn)``: a block's gather -> message -> segment-sum
    step is ``fn(edges) -> node tensors``. Here that is one call over all edges;
    ``ChunkedEdges`` makes it one call per range of receivers, for structures whose
    per-edge tensors do not fit in memory.
    """

    index: torch.Tensor  # [2, E] int64 (sender j, receiver i), receivers global
    rbf: torch.Tensor  # [E, K] radial basis of |r_ij|
    envelope: torch.Tensor  # [E] smooth cutoff u(|r_ij|)
    unit: torch.Tensor  # [E, 3] r_ij / |r_ij|
    inv_avg_neighbors: torch.Tensor  # [] 1 / mean neighbour count (message normalisation)
    num_nodes: int  # N: rows of what aggregate returns
    receivers_sorted: bool = False  # index[1] non-decreasing (the kernels' CSR path)
    # the loss will differentiate the messages twice (conservative-force training): the
    # fused message kernels' double backward recomputes through the reference, so
    # kernels=auto keeps the reference for them
    differentiated_twice: bool = False
    # these edges' receivers are nodes offset .. offset + num_nodes - 1 (one chunk)
    offset: int = 0

    @property
    def sender(self) -> torch.Tensor:  # [E]
        return self.index[0]

    @property
    def receiver(self) -> torch.Tensor:  # [E] global node index
        return self.index[1]

    @property
    def local_index(self) -> torch.Tensor:  # [2, E], receivers in [0, num_nodes)
        if not self.offset:
            return self.index
        return torch.stack([self.index[0], self.index[1] - self.offset])

    def aggregate(self, messages: torch.Tensor) -> torch.Tensor:
        """Σ over each node's incoming edges: [E, ...] -> [num_nodes, ...]."""
        receiver = self.receiver - self.offset if self.offset else self.receiver
        return segment_sum(messages, receiver, self.num_nodes, self.receivers_sorted)

    def map(self, fn: Callable[[Edges], Nodes]) -> Nodes:
        """``fn(self)``: the node tensors (aggregates over incoming edges) it returns."""
        return fn(self)


Nodes = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class ChunkedEdges:
    """The edges of a graph too large to hold its per-edge tensors (a periodic structure of
    10^5-10^6 atoms has 10^7 edges, and each block's messages are a few hundred floats per
    edge). Nothing per edge but the index is kept: ``map(fn)`` computes the geometry of one
    range of receivers at a time (``geometry(e0, e1, n0, n1)``: the ``Edges`` of edges
    e0..e1-1, whose receivers are nodes n0..n1-1), calls ``fn`` on it and concatenates the
    node tensors it returns; under autograd each range is checkpointed, so its per-edge
    tensors are recomputed in backward instead of stored. Memory is then O(nodes) plus one
    chunk's edges; the result equals ``Edges.map`` up to summation order."""

    geometry: Callable[[int, int, int, int], Edges]
    bounds: list[tuple[int, int, int, int]]  # (e0, e1, n0, n1) per chunk, covering all nodes
    inv_avg_neighbors: torch.Tensor
    num_nodes: int

    def map(self, fn: Callable[[Edges], Nodes]) -> Nodes:
        parts = []
        for bound in self.bounds:
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._chunk, fn, *bound, use_reentrant=False))
            else:
                parts.append(self._chunk(fn, *bound))
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    def _chunk(self, fn: Callable[[Edges], Nodes], e0: int, e1: int, n0: int, n1: int) -> Nodes:
        return fn(self.geometry(e0, e1, n0, n1))


def chunk_bounds(receiver: torch.Tensor, num_nodes: int, chunk: int) -> list[tuple]:
    """Split receiver-sorted edges into (e0, e1, n0, n1) ranges of whole receivers with at
    most ``chunk`` edges each (a node with more incoming edges gets a range of its own);
    the node ranges cover 0..num_nodes-1, isolated and padding nodes included."""
    counts = torch.bincount(receiver, minlength=num_nodes)
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).tolist()  # [N + 1]
    bounds, n0 = [], 0
    while n0 < num_nodes:
        # the last node n1 with ptr[n1] - ptr[n0] <= chunk, at least one node further
        n1 = max(n0 + 1, bisect.bisect_right(ptr, ptr[n0] + chunk, lo=n0) - 1)
        n1 = min(n1, num_nodes)
        bounds.append((ptr[n0], ptr[n1], n0, n1))
        n0 = n1
    return bounds


def sort_by_receiver(index: torch.Tensor, *per_edge: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``index [2, E]`` and per-edge tensors ordered by receiver, as the kernels' CSR path
    needs. A stable sort, so sorted edges keep their order (and the results their bits);
    always sorting (O(E), no device-to-host sync, nothing data-dependent for torch.export)
    costs less than checking on a GPU."""
    order = torch.sort(index[1], stable=True).indices
    return (index[:, order], *(t[order] for t in per_edge))
