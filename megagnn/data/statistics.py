"""Normalisation statistics of a run's training split, in one streaming pass.

Per-element reference energies (least squares E_s ≈ Σ_z c_sz e_z), the per-atom energy
residual RMS, the force RMS and the average neighbour count are fitted on the *training*
records only, shard by shard: memory holds one shard's arrays and a 119 x 119 normal matrix,
whatever the size of the data. A validation or test record never informs the model.
"""

from __future__ import annotations

import numpy as np

from megagnn.data.neighbors import neighbor_list
from megagnn.data.shards import MAX_Z, ShardedDataset

NEIGHBOR_SAMPLE = 1000
"""Training structures whose neighbour lists give the average neighbour count when the
shards hold no edge counts at the model's cutoff."""


class _NormalEquations:
    """Accumulates E ≈ C e (C: element counts per structure) and the moments of the
    per-atom residual (E - C e) / n, so the fit and its RMS need no second pass."""

    def __init__(self, size: int = MAX_Z + 1):
        self.ata = np.zeros((size, size))
        self.atb = np.zeros(size)
        self.m_ee, self.m_ce, self.m_cc = 0.0, np.zeros(size), np.zeros((size, size))
        self.count = 0

    def add(self, counts: np.ndarray, energy: np.ndarray) -> None:  # [S, Z], [S]
        n = counts.sum(1)
        per_atom = counts / n[:, None]
        self.ata += counts.T @ counts
        self.atb += counts.T @ energy
        self.m_ee += float(((energy / n) ** 2).sum())
        self.m_ce += per_atom.T @ (energy / n)
        self.m_cc += per_atom.T @ per_atom
        self.count += len(energy)

    def solve(self) -> tuple[dict[int, float], float]:
        present = np.flatnonzero(np.diag(self.ata) > 0)
        a = self.ata[np.ix_(present, present)]
        # a tiny ridge keeps collinear compositions (e.g. only one alloy ratio) solvable
        ridge = 1e-8 * np.trace(a) / max(len(present), 1)
        e = np.linalg.solve(a + ridge * np.eye(len(present)), self.atb[present])
        full = np.zeros(len(self.atb))
        full[present] = e
        var = (self.m_ee - 2 * full @ self.m_ce + full @ self.m_cc @ full) / max(self.count, 1)
        energies = {int(z): float(v) for z, v in zip(present, e, strict=True)}
        return energies, float(np.sqrt(max(var, 0.0)))


def training_statistics(
    dataset: ShardedDataset,
    train: np.ndarray,
    cutoff: float,
    seed: int = 0,
    sample: int = NEIGHBOR_SAMPLE,
) -> dict:
    """Statistics of the records ``train`` (sorted dataset indices), read shard by shard.

    The average neighbour count uses the edge counts stored in the shards when they were
    preprocessed at ``cutoff``; otherwise the neighbour lists of a seeded sample of at most
    ``sample`` training structures (the sample size is recorded).
    """
    train = np.sort(np.asarray(train, dtype=np.int64))
    if len(train) == 0:
        raise ValueError("training statistics need at least one training structure")
    stored_edges = dataset.manifest.get("cutoff") == cutoff
    fit = _NormalEquations()
    elements = np.zeros(MAX_Z + 1, dtype=bool)
    n_atoms = force_sq = force_count = edges = 0
    keys = ["atomic_numbers", "atom_offsets", "energy", "forces"]
    for local, a in dataset.read_selected(train, keys + (["n_edges"] if stored_edges else [])):
        sizes = np.diff(a["atom_offsets"])
        chosen = np.zeros(len(sizes), dtype=bool)
        chosen[local] = True
        atom_chosen = np.repeat(chosen, sizes)
        z = a["atomic_numbers"][atom_chosen].astype(np.int64)
        row = np.repeat(np.arange(len(local)), sizes[local])  # structure of each chosen atom
        width = MAX_Z + 1
        counts = np.bincount(row * width + z, minlength=len(local) * width)
        counts = counts.reshape(len(local), width).astype(np.float64)
        energy = a["energy"][local]
        labelled = np.isfinite(energy)
        fit.add(counts[labelled], energy[labelled])
        elements[z] = True
        n_atoms += int(sizes[local].sum())
        if a["forces"] is not None:  # shards of energy-only data hold no forces
            forces = a["forces"][atom_chosen]
            forces = forces[np.isfinite(forces).all(1)]
            force_sq += float((forces**2).sum())
            force_count += forces.size
        if stored_edges:
            edges += int(a["n_edges"][local].sum())
    energies, residual_rms = fit.solve()
    if stored_edges:
        neighbor_atoms, source = n_atoms, "edge counts of every training structure"
    else:
        picked = np.sort(np.random.default_rng([seed, 2]).permutation(train)[:sample])
        neighbor_atoms, edges = 0, 0
        for i in picked.tolist():
            rec = dataset[i]
            neighbor_atoms += len(rec["atomic_numbers"])
            edges += neighbor_list(rec["positions"], rec["cell"], rec["pbc"], cutoff)[0].shape[1]
        source = f"neighbour lists of {len(picked)} sampled training structures"
    return {
        "n_structures": int(len(train)),
        "n_atoms": n_atoms,
        "elements": np.flatnonzero(elements).tolist(),
        "atomic_energies": {str(z): e for z, e in energies.items()},
        "energy_per_atom_residual_rms": residual_rms,
        "force_rms": float(np.sqrt(force_sq / force_count)) if force_count else None,
        "neighbor_edges": edges,
        "neighbor_atoms": neighbor_atoms,
        "avg_num_neighbors": edges / max(neighbor_atoms, 1),
        "avg_num_neighbors_from": source,
        "cutoff": cutoff,
    }


def scale_of(stats: dict) -> float:
    """The energy head's output scale: a fine-tuned head's pretrained one, else the force
    RMS, else the per-atom energy residual RMS."""
    scale = (
        stats.get("scale")
        or stats.get("force_rms")
        or stats.get("energy_per_atom_residual_rms")
        or 1.0
    )
    return max(float(scale), 1e-6)


def pooled_avg_num_neighbors(stats: list[dict]) -> float:
    """Edges per atom over every dataset's training records together: one normaliser for the
    shared trunk, the same whatever order the datasets are listed in."""
    edges = sum(int(s["neighbor_edges"]) for s in stats)  # integers: no rounding by order
    atoms = sum(int(s["neighbor_atoms"]) for s in stats)
    return max(edges / max(atoms, 1), 1.0)
