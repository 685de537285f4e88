"""A run's state on disk and back: the collective sharded save (weights, moments, weight
average) with the small common part (step, schedule, data position, RNG, statistics,
compute, early stopping, config), and resuming from it under any layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from megagnn.checkpoint import sharded
from megagnn.config import Config, config_to_dict
from megagnn.data.shards import atomic_write_json
from megagnn.parallel.state import ParallelState
from megagnn.training import records
from megagnn.training.budget import Compute, EarlyStopping
from megagnn.training.ema import WeightAverage
from megagnn.training.stopping import TimeBudget


class Trainer(Protocol):
    """What of a ``megagnn.training.trainer.Trainer`` its state is made of."""

    cfg: Config
    par: ParallelState
    model: nn.Module
    optimizer: Any
    scheduler: Any
    average: WeightAverage | None
    sources: list
    statistics: dict
    compute: Compute
    early: EarlyStopping
    clock: TimeBudget | None
    out_dir: Path
    ckpt_dir: Path
    step: int
    max_steps: int
    saved_at: int
    saved_clock: float


def _average(trainer: Trainer):
    return trainer.average.shadow if trainer.average is not None else None


def common_state(trainer: Trainer) -> dict:
    """Everything but the weights and moments: small, the same on every rank."""
    return {
        "scheduler": trainer.scheduler.state_dict(),
        "step": trainer.step,
        "data": {
            "sources": [
                {"epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch} for s in trainer.sources
            ]
        },
        "rng": sharded.rng_state(),  # rank 0's; training draws no random numbers after init
        "statistics": trainer.statistics,
        "compute": trainer.compute.state_dict(),
        "early": trainer.early.state_dict(),
        "config": config_to_dict(trainer.cfg),
        "ema": trainer.average.state_dict() if trainer.average else None,
        "clock": trainer.clock.longest if trainer.clock else None,
    }


def save(trainer: Trainer, best: bool = False) -> None:
    """Collective sharded save; ``latest`` (and with ``best``, ``best``) moves only once
    every rank has written. The run's compute so far goes to compute.json."""
    started = time.perf_counter()
    cfg = trainer.cfg
    sharded.save(
        trainer.ckpt_dir,
        trainer.step,
        trainer.model,
        trainer.optimizer,
        common_state(trainer),
        trainer.par,
        keep=cfg.checkpoint.keep,
        best=best,
        average=_average(trainer),
    )
    if trainer.par.is_main:
        state = {**trainer.compute.state_dict(), "step": trainer.step}
        state["max_steps"] = trainer.max_steps if trainer.clock is None else None
        state["best"] = trainer.early.state_dict() if cfg.validate.patience else None
        atomic_write_json(trainer.out_dir / records.COMPUTE, state)
    trainer.saved_at, trainer.saved_clock = trainer.step, time.perf_counter()
    if trainer.clock is not None:
        trainer.clock.record("save", trainer.saved_clock - started)


def resume(trainer: Trainer, path: Path) -> None:
    """Continue from a checkpoint of the same model and data saved under any parallel
    layout (a different data-parallel size resumes the data order approximately)."""
    common = sharded.load(path, trainer.model, trainer.optimizer, trainer.par, _average(trainer))
    if trainer.average is not None and common.get("ema"):
        trainer.average.load_state_dict(common["ema"])
    if trainer.clock is not None and common.get("clock"):  # durations seen before
        trainer.clock.longest.update(common["clock"])
    trainer.scheduler.load_state_dict(common["scheduler"])
    trainer.step = trainer.saved_at = common["step"]
    positions = common["data"].get("sources", [common["data"]])  # older: one dataset
    if len(positions) != len(trainer.sources):
        raise ValueError(
            f"{path} was saved with {len(positions)} datasets, this run has "
            f"{len(trainer.sources)}; use another train.out_dir or checkpoint.resume=false"
        )
    for source, position in zip(trainer.sources, positions, strict=True):
        source.epoch, source.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
    sharded.set_rng_state(common["rng"])
    if trainer.par.is_main:
        records.trim_metrics(trainer.out_dir, trainer.step)
