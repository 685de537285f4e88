"""megagnn inside torch-sim (``torch-sim-atomistic``): batched MD, relaxation and static
evaluation of many systems at once on one device.

    import torch_sim as ts
    from megagnn.inference.torch_sim import MegaGNNModel

    model = MegaGNNModel("runs/quickstart")           # fp64 on the default device
    state = ts.io.atoms_to_state(list_of_atoms, model.device, model.dtype)
    final = ts.integrate(system=state, model=model, integrator=ts.nvt_langevin,
                         n_steps=100, timestep=0.002, temperature=300)

``MegaGNNModel`` implements torch-sim's ``ModelInterface``: one call takes a ``SimState``
of several systems and returns energy [n_systems] (eV), forces [n_atoms, 3] (eV/Å) and
stress [n_systems, 3, 3] (eV/Å^3, ASE's sign, as torch-sim's other models). Neighbour
lists are megagnn's own (vesin, per system), so every system sees exactly the graph the
ASE calculator and training give it. Systems holding elements the model never trained on
are refused, naming them, unless ``allow_unknown_elements``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from megagnn import keys as K
from megagnn.checkpoint import open_saved
from megagnn.data.graph import collate, structure_to_graph, to_device
from megagnn.elements import check_elements
from megagnn.models import Potential
from megagnn.parallel.state import default_device


class MegaGNNModel(ModelInterface):
    """A megagnn Potential (or a run, checkpoint or consolidated folder) for torch-sim.

    ``head``: which energy head (index or name) a multi-head model answers with.
    """

    def __init__(
        self,
        model: Potential | str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        compute_forces: bool = True,
        compute_stress: bool = True,
        head: int | str = 0,
        allow_unknown_elements: bool = False,
    ):
        super().__init__()
        device = torch.device(device) if device is not None else default_device()
        if not isinstance(model, Potential):
            model = open_saved(model).model(device, dtype)
        self.model = model.to(device, dtype).eval()
        cfg = self.model.cfg
        self.head = cfg.heads.index(head) if isinstance(head, str) else int(head)
        self._device, self._dtype = device, dtype
        self._compute_forces = compute_forces and cfg.forces != "none"
        conservative = cfg.forces == "conservative"
        self._compute_stress = compute_stress and self._compute_forces and conservative
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff
        self.allow_unknown_elements = allow_unknown_elements
        self.elements = self.model.elements(self.head)

    @ModelInterface.compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        conservative = self.model.cfg.forces == "conservative"
        if value and not (self._compute_forces and conservative):
            raise NotImplementedError("stress needs conservative forces (model.forces)")
        self._compute_stress = value

    @ModelInterface.compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        if value and self.model.cfg.forces == "none":
            raise NotImplementedError("this model predicts energies only (model.forces=none)")
        self._compute_forces = value

    def forward(self, state: SimState | dict, **kwargs) -> dict[str, torch.Tensor]:
        if isinstance(state, dict):
            state = SimState(**state, masses=torch.ones_like(state["positions"]))
        numbers = state.atomic_numbers
        check_elements(
            numbers.unique().tolist(), self.elements, "this model", self.allow_unknown_elements
        )
        # atoms grouped by system (torch-sim keeps them so; the stable sort makes sure)
        order = torch.argsort(state.system_idx, stable=True)
        system = state.system_idx[order].cpu().numpy()
        positions = state.positions[order].detach().cpu().numpy().astype(np.float64)
        z = numbers[order].cpu().numpy()
        cells = state.row_vector_cell.detach().cpu().numpy().astype(np.float64)
        pbc = np.broadcast_to(np.asarray(state.pbc, dtype=bool), (3,)).copy()
        bounds = np.searchsorted(system, np.arange(state.n_systems + 1))
        cutoff = self.model.cfg.cutoff
        graphs = [
            structure_to_graph(
                {
                    "atomic_numbers": z[a:b],
                    "positions": positions[a:b],
                    "cell": cells[s],
                    "pbc": pbc,
                },
                cutoff,
            )
            for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        batch = to_device(collate(graphs), self._device, self._dtype)
        batch[K.HEAD][:] = self.head
        out = self.model(
            batch, compute_forces=self._compute_forces, compute_stress=self._compute_stress
        )
        result = {"energy": out[K.ENERGY].detach().to(self._dtype)}
        if self._compute_forces:
            forces = torch.empty_like(out[K.FORCES])
            forces[order.to(forces.device)] = out[K.FORCES].detach()
            result["forces"] = forces
        if self._compute_stress:
            result["stress"] = out[K.STRESS].detach()
        return result
