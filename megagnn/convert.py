"""Checkpoint conversion through an unsharded intermediate (the formats live in
``megagnn.checkpoint``).

``consolidate``: a sharded training checkpoint of any tensor x pipeline layout -> one
``model.safetensors`` (global parameter names and shapes) + ``config.json``. The file is
streamed tensor by tensor (each read from the shards, written at its offset), so memory
stays at about the largest single weight, whatever the model size.

``reshard``: a sharded training checkpoint -> a new run folder whose checkpoint is written by
the ranks of another tensor x pipeline x data layout, with the optimizer moments, schedule,
data position and RNG state carried over, so training resumes there as from the original.
(Any layout can also resume the original directly; resharding lays the files out for the
new layout, so each rank reads its own, and records the layout in the saved config.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from megagnn.checkpoint import CheckpointError, consolidated, open_saved, sharded
from megagnn.checkpoint.saved import SHARDED
from megagnn.config import config_to_dict
from megagnn.precision import DTYPES
from megagnn.training.build import ModelSpec, build_rank_model, build_rank_optimizer
from megagnn.training.ema import WeightAverage
from megagnn.training.host_memory import return_freed_memory
from megagnn.training.sources import SPLITS, recorded_run


def _refuse_inside(source: Path, checkpoint: Path, out_dir: Path) -> None:
    """A conversion never writes into what it reads: the source folder, its run folder
    itself, or the checkpoints (a subfolder of the run such as ``run/consolidated`` is
    fine)."""
    out = out_dir.resolve()
    run = recorded_run(checkpoint)
    same = {source.resolve(), *([run.resolve()] if run is not None else [])}
    inside = {checkpoint.resolve(), checkpoint.resolve().parent}  # a step and checkpoints/
    if out in same | inside or any(folder in out.parents for folder in inside):
        raise CheckpointError(
            f"output {out_dir} is the source, its run folder or among its checkpoints, "
            "which are being read; write to another folder"
        )


def consolidate(
    source: str | Path, out_dir: str | Path, progress: bool = True, average: bool = True
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` from a checkpoint
    (a checkpoint folder, a run folder or its ``checkpoints`` folder): the averaged weights
    where the run kept an average (optim.ema_decay) and ``average``, else the trained ones."""
    saved = open_saved(source)
    if saved.kind != SHARDED:
        raise CheckpointError(f"{source} is consolidated already")
    path, out_dir = saved.path, Path(out_dir)
    _refuse_inside(Path(source), path, out_dir)
    meta = sharded.tensors_metadata(path)
    keys = sorted(k for k in meta if k.startswith("model."))
    if not keys:
        raise CheckpointError(f"{path} holds no model weights")
    # the weights themselves: the average where there is one (same names and shapes)
    sources = {k: f"ema.{k.removeprefix('model.')}" for k in keys}
    sources = {k: v if average and v in meta else k for k, v in sources.items()}
    weights = "ema" if any(v != k for k, v in sources.items()) else "trained"
    by_name = {k.removeprefix("model."): sources[k] for k in keys}
    out_dir.mkdir(parents=True, exist_ok=True)
    return_freed_memory()
    reader = sharded.TensorReader(path)
    consolidated.write_weights(
        out_dir / consolidated.WEIGHTS,
        [(k.removeprefix("model."), meta[k].global_shape, meta[k].dtype) for k in keys],
        lambda name: reader.read(by_name[name], meta[by_name[name]]),
        {"step": str(saved.step), "weights": weights},
        lambda entries: tqdm(entries, desc="consolidate", unit=" tensors", disable=not progress),
    )
    info = {"config": saved.config_dict, "step": saved.step, "source": str(path)}
    info["weights"] = weights
    if saved.statistics is not None:  # the training split's statistics travel too
        info["statistics"] = saved.statistics
    consolidated.write_config(out_dir, info)
    run = recorded_run(path)  # the run's split travels too, for evaluation
    if run is not None:
        shutil.copyfile(run / SPLITS, out_dir / SPLITS)
    return out_dir / consolidated.WEIGHTS


def reshard(source: str | Path, out_dir: str | Path, par) -> Path:
    """Collective: every rank of the target layout (``par``) calls it. Loads this rank's part
    of the model and optimizer from ``source`` (saved under any layout) and saves them as
    ``out_dir/checkpoints/step-N``. Returns that folder."""
    saved = open_saved(source)
    if saved.kind != SHARDED:
        raise CheckpointError(f"{source} is consolidated: only a training checkpoint reshards")
    _refuse_inside(Path(source), saved.path, Path(out_dir))
    path, cfg = saved.path, saved.config
    cfg.parallel.tensor, cfg.parallel.pipeline = par.tp_size, par.pp_size
    cfg.train.out_dir = str(out_dir)
    if par.pp_size > 1 and cfg.model.forces == "conservative":
        raise ValueError(
            f"{path} trains conservative forces, which pipeline stages cannot; "
            "reshard to pipeline=1"
        )
    dtype = DTYPES[cfg.train.precision]
    spec = ModelSpec.of(cfg.model)
    potential, stage = build_rank_model(cfg, par, dtype, spec)  # as the Trainer builds it
    model = (stage or potential).to(par.device, dtype)
    optimizer = build_rank_optimizer(cfg, model, par, spec)
    average = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    shadow = average.shadow if average is not None else None
    loaded = sharded.load(path, model, optimizer, par, shadow)
    loaded["config"] = config_to_dict(cfg)
    return sharded.save(
        Path(out_dir) / "checkpoints", loaded["step"], model, optimizer, loaded, par, average=shadow
    )
