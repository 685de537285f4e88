"""Energy/force/stress loss and error metrics, per head in units of the head's scale."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from megagnn import keys as K
from megagnn.config import LossConfig


def _penalty(err: torch.Tensor, kind: str) -> torch.Tensor:
    if err.numel() == 0:
        return err.new_zeros(())
    if kind == "huber":
        return F.huber_loss(err, torch.zeros_like(err), delta=0.01)
    if kind == "l1":
        return err.abs().mean()
    return (err * err).mean()


def loss_terms(
    pred: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    scale: torch.Tensor,  # [heads] eV/Å, from the model
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """Weighted loss and its terms. Errors are divided by the head's scale so the terms are
    dimensionless and comparable: energy per atom (or per structure, ``cfg.energy``), force
    components, and stress components times the volume per atom (the virial per atom)."""
    head = batch[K.HEAD]  # [B]
    s_graph = scale[head]  # [B]
    dtype = batch[K.POSITIONS].dtype
    n = batch[K.N_ATOMS].to(dtype)
    # total energies are fp64 (references added there); the difference is cast down
    err = (pred[K.ENERGY] - batch[K.ENERGY]).to(dtype) / s_graph
    if cfg.energy == "per_atom":
        err = err / n
    err = err[batch[K.HAS_ENERGY]]
    terms = {"energy": _penalty(err, cfg.function)}
    total = cfg.energy_weight * terms["energy"]
    if K.FORCES in pred:
        atom_mask = batch[K.HAS_FORCES][batch[K.BATCH]]  # [N]
        s_atom = s_graph[batch[K.BATCH]].unsqueeze(-1)
        err = ((pred[K.FORCES] - batch[K.FORCES]) / s_atom)[atom_mask]
        terms["forces"] = _penalty(err, cfg.function)
        total = total + cfg.force_weight * terms["forces"]
    if K.STRESS in pred:
        mask = batch[K.HAS_STRESS] & batch[K.PBC].all(dim=1)
        # stress x volume per atom is the virial per atom (eV), comparable to energy per atom
        volume_per_atom = torch.linalg.det(batch[K.CELL]).abs() / n
        err = (pred[K.STRESS] - batch[K.STRESS]) * (volume_per_atom / s_graph)[:, None, None]
        err = err[mask]
        terms["stress"] = _penalty(err, cfg.function)
        total = total + cfg.stress_weight * terms["stress"]
    terms["total"] = total
    return terms


class ErrorMeter:
    """Accumulates errors over batches: energy per atom and per structure (eV, MAE and RMSE),
    forces (eV/Å), stress (eV/Å^3)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _add(self, name: str, err: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(err.abs().sum())
        self.counts[name] = self.counts.get(name, 0) + err.numel()

    def _sq(self, name: str, err: torch.Tensor) -> None:
        """A root-mean-square entry: sums squares, ``result`` takes the root."""
        self.sums[name] = self.sums.get(name, 0.0) + float((err * err).sum())
        self.counts[name] = self.counts.get(name, 0) + err.numel()

    @torch.no_grad()
    def update(
        self,
        pred: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        reference_energy: torch.Tensor,
    ) -> None:
        n = batch[K.N_ATOMS].to(torch.float64)
        has = batch[K.HAS_ENERGY]
        err = (pred[K.ENERGY].detach().double() - batch[K.ENERGY])[has]
        self._add("energy_per_atom_mae", err / n[has])
        self._add("energy_mae", err)
        self._sq("energy_rmse", err)
        # baseline: reference energies alone (what the model adds on top of them)
        self._add("baseline_energy_per_atom_mae", ((reference_energy - batch[K.ENERGY]) / n)[has])
        if K.FORCES in pred:
            mask = batch[K.HAS_FORCES][batch[K.BATCH]]
            self._add("forces_mae", (pred[K.FORCES].detach() - batch[K.FORCES])[mask])
            self._add("baseline_zero_forces_mae", batch[K.FORCES][mask])
        if K.STRESS in pred:
            mask = batch[K.HAS_STRESS] & batch[K.PBC].all(dim=1)
            self._add("stress_mae", (pred[K.STRESS].detach() - batch[K.STRESS])[mask])
            self._add("baseline_zero_stress_mae", batch[K.STRESS][mask])

    NAMES = (
        "energy_per_atom_mae",
        "energy_mae",
        "energy_rmse",
        "baseline_energy_per_atom_mae",
        "forces_mae",
        "baseline_zero_forces_mae",
        "stress_mae",
        "baseline_zero_stress_mae",
    )

    def all_reduce(self, group, device: torch.device) -> None:
        """Add up the sums and counts of every rank of ``group`` (each evaluated part of the
        data); a rank that saw no stress still takes part."""
        values = [self.sums.get(k, 0.0) for k in self.NAMES]
        values += [float(self.counts.get(k, 0)) for k in self.NAMES]
        total = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total, group=group)
        n = len(self.NAMES)
        self.sums = dict(zip(self.NAMES, total[:n].tolist(), strict=True))
        self.counts = {k: round(c) for k, c in zip(self.NAMES, total[n:].tolist(), strict=True)}

    def result(self) -> dict[str, float]:
        """Mean absolute errors of the quantities the data had (no stress for molecules)."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        return {k: v**0.5 if k.endswith("_rmse") else v for k, v in out.items()}
