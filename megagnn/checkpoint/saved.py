"""``open_saved``: one way in to every saved model, whatever its format.

A sharded training checkpoint (a run folder, its ``checkpoints`` folder or one checkpoint
folder, saved under any tensor x pipeline x data layout) and a consolidated folder
(``model.safetensors`` + ``config.json``) answer the same questions: the run's config and
step, its statistics, a whole model for inference, or this rank's slices of a model being
fine-tuned under any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megagnn.checkpoint import consolidated, sharded
from megagnn.checkpoint.errors import CheckpointError
from megagnn.config import Config, config_from_dict, upgrade_saved
from megagnn.models import Potential, build_model
from megagnn.parallel.materialize import materialize
from megagnn.parallel.state import ParallelState
from megagnn.parallel.tensor import parallelize_tensor

SHARDED, CONSOLIDATED = "sharded", "consolidated"


class Saved:
    """A saved model, opened: nothing but its config and the files' integrity is read until
    weights are asked for."""

    def __init__(self, path: Path, kind: str, info: dict[str, Any]):
        self.path, self.kind = path, kind
        self.config_dict: dict[str, Any] = upgrade_saved(info["config"])
        self.step = int(info["step"])
        self.statistics: dict | None = info.get("statistics")

    @property
    def config(self) -> Config:
        return config_from_dict(self.config_dict)

    def __repr__(self) -> str:
        return f"Saved({str(self.path)!r}, {self.kind}, step {self.step})"

    # -- whole tensors ---------------------------------------------------------------------
    def read_whole(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One weight or buffer, whole, by its global name (trained weights, not averaged).
        ``device``: the communication device when every rank of a job reads it."""
        if self.kind == CONSOLIDATED:
            with consolidated.open_weights(self.path) as f:
                return f.get_tensor(name)
        meta = sharded.tensors_metadata(self.path)
        key = f"model.{name}"
        if key not in meta:
            raise CheckpointError(f"{self.path} holds no tensor {name}")
        return sharded.read_tensor(self.path, key, meta[key], device).cpu()

    # -- models ----------------------------------------------------------------------------
    def model(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        par: ParallelState | None = None,
        node_parallel: bool = False,
    ) -> Potential:
        """The whole model in eval mode: the averaged weights where the run kept an
        average. With ``par`` of a tensor-parallel group, this rank's slices of it
        (``parallel.tensor.parallelize_tensor``; ``node_parallel`` also splits the atoms
        between blocks): every rank of the group then evaluates the same structures
        together, each holding 1/tp of the weights and of the per-atom activations."""
        if par is not None and par.tp_size > 1:
            cfg = self.config
            model = build_model(cfg.model, device="meta")
            model = parallelize_tensor(model, par.tp_group, node_parallel)
            materialize(model, cfg.train.seed)  # every tensor is overwritten below
            absent = self.load_into(model, par)
            if absent:
                raise CheckpointError(f"{self.path} lacks {', '.join(absent)}")
            return model.to(device, dtype).eval()
        model = build_model(self.config.model)
        if self.kind == CONSOLIDATED:
            weights = consolidated.load_weights(self.path)
            for key in model.state_dict().keys() - weights.keys():  # buffers newer than it
                derived = sharded.derived_from(key)
                if derived is not None and derived[0] in weights:
                    weights[key] = derived[1](weights[derived[0]])
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                raise CheckpointError(f"{self.path / consolidated.WEIGHTS}: {e}") from e
        else:
            absent = sharded.load_weights(
                self.path, model, ParallelState(device=torch.device("cpu"))
            )
            if absent:
                raise CheckpointError(f"{self.path} lacks {', '.join(absent)}")
        return model.to(device, dtype).eval()

    def load_into(
        self,
        model: nn.Module,
        par: ParallelState,
        key_map: Callable[[str], str | None] = lambda key: key,
    ) -> list[str]:
        """Fill this rank's slices of ``model`` (cut under any layout) from the saved
        weights, the averaged ones where there are. ``key_map``: the saved tensor each global
        name loads from (None: leave it). Returns the names the file lacks. Collective under
        torchrun for a sharded checkpoint."""
        if self.kind == SHARDED:
            return sharded.load_weights(self.path, model, par, key_map)
        absent = []
        with consolidated.open_weights(self.path) as f, torch.no_grad():
            names = set(f.keys())
            for key, (tensor, offsets, _) in sharded.placements(model, None, False, par).items():
                name = key.removeprefix("model.")
                source = key_map(name)
                if source is None:
                    continue
                if source not in names:
                    absent.append(name)
                    continue
                piece = f.get_slice(source)
                shape = tuple(piece.get_shape())
                if shape != sharded.global_shape(tensor, offsets):
                    raise CheckpointError(
                        f"{self.path}: {source} has shape {shape}, this model's {name} "
                        f"{sharded.global_shape(tensor, offsets)}; build the same architecture"
                    )
                index = [slice(None)] * len(shape)
                for dim, rank, _ in offsets:  # this rank's slice only
                    n = tensor.shape[dim]
                    index[dim] = slice(rank * n, (rank + 1) * n)
                tensor.copy_(piece[tuple(index)])
        return absent


def open_saved(path: str | Path, which: str = sharded.LATEST) -> Saved:
    """The saved model at ``path``: a consolidated folder, a checkpoint folder, or a run or
    checkpoints folder (its ``latest``, or with ``which="best"`` its best checkpoint where it
    has one). Every file it will read is checked first: a missing, truncated or corrupt one
    raises CheckpointError naming it."""
    path = Path(path)
    if str(path).endswith(".pt2"):
        raise CheckpointError(
            f"{path} is an inference package; load it with megagnn.inference.Package (the "
            "calculator and megagnn.evaluate take it directly)"
        )
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; give the run, checkpoint or consolidated folder holding it"
        )
    if consolidated.is_consolidated(path):
        info = consolidated.read_config(path)
        consolidated.check_weights(path)
        return Saved(path, CONSOLIDATED, info)
    folder = sharded.resolve(path, which)
    sharded.verify(folder)
    return Saved(folder, SHARDED, sharded.read_common(folder))
