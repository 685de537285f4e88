"""Neighbour lists with periodic boundary conditions (vesin)."""

from __future__ import annotations

import numpy as np
from vesin import NeighborList


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs within ``cutoff`` and their integer cell shifts.

    Returns ``edge_index [2, E]`` (sender j, receiver i), sorted by receiver, and
    ``shifts [E, 3]`` such that ``r_ij = positions[j] - positions[i] + shifts @ cell``.
    Handles triclinic cells, mixed periodicity (a non-periodic direction may have a zero
    cell vector) and isolated atoms, which get no edges.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    if len(positions) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    nl = NeighborList(cutoff=float(cutoff), full_list=True, sorted=True)
    i, j, shifts = nl.compute(positions, cell, pbc, quantities="ijS")
    edge_index = np.stack([j.astype(np.int64), i.astype(np.int64)])
    return edge_index, shifts.astype(np.int64)
