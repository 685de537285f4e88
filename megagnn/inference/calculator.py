"""ASE calculator backed by a trained megagnn checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from megagnn import keys as K
from megagnn.config import config_from_dict
from megagnn.convert import is_consolidated, load_consolidated
from megagnn.data.graph import atoms_to_graph, to_device
from megagnn.models import Potential, build_model
from megagnn.parallel.state import ParallelState
from megagnn.training import checkpoint


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
) -> Potential:
    """The whole model, in eval mode, from a run folder (its latest checkpoint), a
    checkpoint folder saved under any tensor/pipeline layout, or a consolidated folder
    (``tools/convert_checkpoint.py consolidate``)."""
    if is_consolidated(path):
        config, weights = load_consolidated(path)
        model = build_model(config_from_dict(config).model)
        model.load_state_dict(weights)
    else:
        cfg = config_from_dict(checkpoint.read_common(path)["config"])
        model = build_model(cfg.model)
        checkpoint.load(path, model, None, ParallelState(device=torch.device("cpu")))
    return model.to(device, dtype).eval()


class MegaGNNCalculator(Calculator):
    """Energy, forces and (for periodic cells) stress from a megagnn model.

    Runs in fp64 by default: MD energy conservation needs more than fp32 gives.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: str | Path | Potential,
        head: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model = model if isinstance(model, Potential) else load_model(model, device, dtype)
        self.device, self.dtype, self.head = torch.device(device), dtype, head
        self.cutoff = self.model.cfg.cutoff

    def calculate(
        self, atoms: Atoms | None = None, properties=None, system_changes=all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        batch = to_device(atoms_to_graph(self.atoms, self.cutoff), self.device, self.dtype)
        batch[K.HEAD][:] = self.head
        periodic = bool(self.atoms.pbc.all())
        out = self.model(batch, compute_stress=periodic and self.model.cfg.stress)
        energy = float(out[K.ENERGY][0].detach())
        self.results = {"energy": energy, "free_energy": energy}
        if K.FORCES in out:
            self.results["forces"] = out[K.FORCES].detach().cpu().numpy().astype(np.float64)
        if K.STRESS in out:
            stress = out[K.STRESS][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
