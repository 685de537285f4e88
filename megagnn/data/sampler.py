"""Batches packed to an atom/edge budget, deterministic and resumable (splits: splits.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megagnn.data.graph import collate, structure_to_graph
from megagnn.data.shards import ShardedDataset


def pack_batches(
    order: np.ndarray,
    atoms: np.ndarray,
    max_atoms: int,
    edges: np.ndarray | None = None,
    max_edges: int | None = None,
) -> list[np.ndarray]:
    """Greedily cut ``order`` into consecutive batches within the budgets.

    ``atoms[k]`` / ``edges[k]`` are the sizes of structure ``order[k]``. A structure larger
    than a budget on its own forms a batch by itself.
    """
    batches, start = [], 0
    a_sum = e_sum = 0
    for k in range(len(order)):
        a, e = int(atoms[k]), int(edges[k]) if edges is not None else 0
        over = a_sum + a > max_atoms or (max_edges is not None and e_sum + e > max_edges)
        if over and k > start:
            batches.append(order[start:k])
            start, a_sum, e_sum = k, 0, 0
        a_sum += a
        e_sum += e
    if start < len(order):
        batches.append(order[start:])
    return batches


class BudgetBatchSampler:
    """Batches of dataset indices for one epoch, shuffled by (seed, epoch).

    Every data-parallel rank packs the same batches and takes every ``world_size``-th one,
    so ranks see disjoint data; an epoch is cut to a multiple of ``world_size`` batches so
    all ranks make the same number of steps (``drop_last=False``, for evaluation, keeps
    every batch).
    """

    def __init__(
        self,
        indices: np.ndarray,
        n_atoms: np.ndarray,
        max_atoms: int,
        n_edges: np.ndarray | None = None,
        max_edges: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        self.indices = np.asarray(indices)
        self.n_atoms = np.asarray(n_atoms)
        self.n_edges = None if n_edges is None else np.asarray(n_edges)
        self.max_atoms, self.max_edges = max_atoms, max_edges
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        if len(self.indices) == 0:
            raise ValueError("cannot sample batches from an empty split")

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        else:
            perm = np.arange(len(self.indices))
        edges = None if self.n_edges is None else self.n_edges[perm]
        packed = pack_batches(
            self.indices[perm], self.n_atoms[perm], self.max_atoms, edges, self.max_edges
        )
        if not self.drop_last:  # evaluation: every structure once, some ranks a batch more
            return packed[self.rank :: self.world_size]
        usable = len(packed) - len(packed) % self.world_size
        if usable == 0:
            raise ValueError(
                f"split yields {len(packed)} batches, fewer than the {self.world_size} ranks"
            )
        return packed[self.rank : usable : self.world_size]


class GraphDataset(Dataset):
    """Dataset records turned into graphs at a given cutoff (in the loader workers), each
    labelled with the energy head (dataset family) its dataset trains."""

    def __init__(self, data: ShardedDataset, cutoff: float, head: int = 0):
        self.data, self.cutoff, self.head = data, cutoff, head

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return structure_to_graph({**self.data[index], "head": self.head}, self.cutoff)


def _collate_batch(items: list[list[dict]]) -> dict[str, torch.Tensor]:
    return collate(items[0])


class _BatchDataset(Dataset):
    """Maps a batch (array of indices) to its list of graphs, so workers build whole batches."""

    def __init__(self, graphs: GraphDataset, batches: list[np.ndarray]):
        self.graphs, self.batches = graphs, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.graphs[int(i)] for i in self.batches[k]]


def iterate_batches(
    graphs: GraphDataset,
    sampler: BudgetBatchSampler,
    epoch: int,
    start: int = 0,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``epoch`` from batch number ``start`` on (for resume)."""
    batches = sampler.batches(epoch)[start:]
    loader = DataLoader(
        _BatchDataset(graphs, batches),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_batch,
        persistent_workers=False,
    )
    yield from loader
