"""Atomic checkpoints holding everything needed to resume exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def write_shard(ckpt_dir: str | Path, step: int, state: dict[str, Any], shard: str = "") -> Path:
    """Write one process's part of a checkpoint (``shard`` names it, e.g. ``-tp1of2``)
    under a temporary name, fsync, rename. Not visible to resume until ``commit``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"{_tag(step)}{shard}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def commit(ckpt_dir: str | Path, step: int, keep: int = 2) -> None:
    """Point ``latest`` at ``step`` (atomically) once all its shards are written; prune."""
    ckpt_dir = Path(ckpt_dir)
    latest_tmp = ckpt_dir / (LATEST + ".tmp")
    latest_tmp.write_text(_tag(step))
    os.replace(latest_tmp, ckpt_dir / LATEST)
    tags = sorted({p.name[:13] for p in ckpt_dir.glob("step-*.pt")})
    for tag in tags[:-keep] if keep > 0 else []:
        for p in ckpt_dir.glob(f"{tag}*.pt"):
            p.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Single-process save: a crash at any moment leaves ``latest`` naming a complete
    checkpoint (or nothing)."""
    path = write_shard(ckpt_dir, step, state)
    commit(ckpt_dir, step, keep)
    return path


def latest_checkpoint(ckpt_dir: str | Path, shard: str = "") -> Path | None:
    """This shard of the checkpoint ``latest`` points at, or None if none was completed."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / f"{pointer.read_text().strip()}{shard}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist (was the run saved with "
            "another tensor-parallel layout?)"
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign files raise many types
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from e
