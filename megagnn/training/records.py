"""What a run folder records beside its checkpoints, and the checks that keep a resumed run
on the data it started with: splits.npz, statistics.json, compute.json, metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from megagnn.config import Config, ConfigError, config_from_dict
from megagnn.data.shards import atomic_write_json, atomic_write_text
from megagnn.parallel.state import ParallelState
from megagnn.training.sources import (
    SPLITS,
    STATISTICS,
    Source,
    config_changes,
    read_splits,
    run_statistics,
    split_arrays,
)

COMPUTE = "compute.json"
METRICS = "metrics.jsonl"


def check_resumable(cfg: Config, common: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of another model or other data: a changed split, split
    seed or dataset list would silently mix held-out data into training (the split itself:
    ``check_recorded_split``)."""
    saved = config_from_dict(common["config"])
    changes = config_changes(saved.model, cfg.model, "model", ignore=("sized_for",))
    # the loader's worker count changes nothing the model sees
    changes += config_changes(saved.data, cfg.data, "data", ignore=("num_workers",))
    if changes:
        raise ConfigError(
            f"cannot resume {path}: this run's config differs from the checkpoint's in "
            + "; ".join(changes)
            + ". Use another train.out_dir, or checkpoint.resume=false to start over"
        )


def check_recorded_split(sources: list[Source], out_dir: Path) -> None:
    """Refuse a run whose split differs from the splits.npz already in its folder (a resumed
    run's, or one put there by hand): it is never overwritten, since the models and results
    beside it were made on it."""
    recorded = out_dir / SPLITS
    if not recorded.is_file():
        return
    for source in sources:
        try:
            old = read_splits(out_dir, source.name if len(sources) > 1 else None)
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"{recorded} is unreadable or not a split ({e})") from e
        for name, idx in source.data.indices.items():
            if not np.array_equal(old[name], idx):
                raise ConfigError(
                    f"the {name} split of {source.data.path} differs from the one recorded "
                    f"in {recorded} ({len(old[name])} vs {len(idx)} records): the dataset or "
                    "the data settings changed since it was written. To train on that split "
                    f"set data.split_file={recorded}; otherwise use another train.out_dir"
                )


def training_statistics(sources: list[Source], par: ParallelState, saved: dict | None) -> dict:
    """The run's normalisation statistics: a resumed run's own, else computed from the
    training splits on rank 0 (one streaming pass) and sent to every rank."""
    if saved is not None and "statistics" in saved:
        return saved["statistics"]
    box = [run_statistics(sources) if par.rank == 0 else None]
    if torch.distributed.is_initialized() and par.world_size > 1:
        torch.distributed.broadcast_object_list(box, src=0, device=par.device)
    return box[0]


def record_run(out_dir: Path, sources: list[Source], statistics: dict) -> None:
    """Write the run's split (splits.npz: dataset record indices) and its training
    statistics (statistics.json) before the first step; main rank only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / SPLITS).is_file():  # one already there is equal (check_recorded_split)
        tmp = out_dir / (SPLITS + ".tmp.npz")
        np.savez(tmp, **split_arrays(sources))
        os.replace(tmp, out_dir / SPLITS)
    atomic_write_json(out_dir / STATISTICS, statistics)


def trim_metrics(out_dir: Path, step: int) -> None:
    """Drop the metrics.jsonl lines logged after the checkpoint being resumed (and a line a
    crash cut short): the resumed run logs those steps again, so the file stays one curve."""
    path = out_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def append_metrics(out_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """One JSON line per log event (train and val/ keys)."""
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
