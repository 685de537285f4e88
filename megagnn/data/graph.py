"""Structures -> graphs (neighbour lists) -> batched graphs."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms

from megagnn import keys as K
from megagnn.data.neighbors import neighbor_list


def structure_to_graph(s: dict[str, np.ndarray], cutoff: float) -> dict[str, torch.Tensor]:
    """One structure record (as ShardedDataset returns it) -> graph tensors, with targets."""
    edge_index, shifts = neighbor_list(s["positions"], s["cell"], s["pbc"], cutoff)
    n = len(s["atomic_numbers"])
    forces = s.get("forces")
    stress = s.get("stress")
    has_forces = forces is not None and bool(np.isfinite(forces).all())
    has_stress = stress is not None and bool(np.isfinite(stress).all())
    energy = float(s.get("energy", np.nan))
    has_energy = bool(np.isfinite(energy))
    return {
        K.ATOMIC_NUMBERS: torch.as_tensor(s["atomic_numbers"], dtype=torch.long),
        K.POSITIONS: torch.as_tensor(s["positions"], dtype=torch.float64),
        K.CELL: torch.as_tensor(s["cell"], dtype=torch.float64).reshape(1, 3, 3),
        K.PBC: torch.as_tensor(s["pbc"], dtype=torch.bool).reshape(1, 3),
        K.N_ATOMS: torch.tensor([n]),
        K.EDGE_INDEX: torch.from_numpy(edge_index),
        K.CELL_SHIFTS: torch.from_numpy(shifts).to(torch.float64),
        K.HEAD: torch.tensor([int(s.get("head", 0))]),
        K.ENERGY: torch.tensor([energy if has_energy else 0.0], dtype=torch.float64),
        K.FORCES: torch.as_tensor(forces if has_forces else np.zeros((n, 3))),
        K.STRESS: torch.as_tensor(stress if has_stress else np.zeros((3, 3))).reshape(1, 3, 3),
        K.HAS_ENERGY: torch.tensor([has_energy]),
        K.HAS_FORCES: torch.tensor([has_forces]),
        K.HAS_STRESS: torch.tensor([has_stress]),
    }


def atoms_to_record(atoms: Atoms) -> dict[str, np.ndarray]:
    """An ASE Atoms object as a structure record without targets (structure_to_graph's input)."""
    return {
        "atomic_numbers": atoms.get_atomic_numbers(),
        "positions": atoms.get_positions(),
        "cell": atoms.get_cell()[:],
        "pbc": atoms.get_pbc(),
    }


def atoms_to_graph(atoms: Atoms, cutoff: float) -> dict[str, torch.Tensor]:
    """An ASE Atoms object (no targets) -> a one-structure batch."""
    return collate([structure_to_graph(atoms_to_record(atoms), cutoff)])


def collate(graphs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate graphs into one disconnected graph; edge indices are offset per graph."""
    n_atoms = torch.cat([g[K.N_ATOMS] for g in graphs])
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    out = {
        key: torch.cat([g[key] for g in graphs]) for key in graphs[0] if key not in (K.EDGE_INDEX,)
    }
    out[K.EDGE_INDEX] = torch.cat(
        [g[K.EDGE_INDEX] + off for g, off in zip(graphs, offsets.tolist(), strict=True)], dim=1
    )
    receivers = out[K.EDGE_INDEX][1]
    if receivers.numel() > 1 and bool((receivers[1:] < receivers[:-1]).any()):
        # the aggregation kernels' deterministic path relies on it (Edges.receivers_sorted)
        raise ValueError("edges must be sorted by receiver within each graph")
    out[K.BATCH] = torch.repeat_interleave(torch.arange(len(graphs)), n_atoms)
    return out


# targets that stay fp64 on the device: total energies of ~1e4 eV have fp32 spacing ~1 meV
FULL_PRECISION = (K.ENERGY,)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Move a batch; floating tensors take the model's geometry dtype, energies stay fp64."""
    return {
        k: v.to(
            device=device,
            dtype=v.dtype if k in FULL_PRECISION or not v.is_floating_point() else dtype,
        )
        for k, v in batch.items()
    }
