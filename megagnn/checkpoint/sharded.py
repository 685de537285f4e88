"""Sharded, atomic checkpoints with megatron-core ``dist_checkpointing``.

Every weight (and its AdamW moments) is saved as a ShardedTensor: its *global* name and
shape, and where this rank's piece sits in it (tensor-parallel slice, pipeline stage by the
block's global index). A checkpoint written under one tensor x pipeline x data layout loads
under any other, including a single process. The rest of the state (step, schedule, data
position, RNG, config) is one small common dict written by rank 0.

Layout on disk::

    checkpoints/step-00000200/   metadata.json, common.pt, *.distcp
    checkpoints/latest           "step-00000200", replaced atomically after a complete save

A save goes to ``step-XXXXXXXX.tmp/`` and is renamed only when every rank has written, so a
crash at any moment leaves ``latest`` naming a complete checkpoint (or nothing).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from megagnn.checkpoint.errors import CheckpointError
from megagnn.parallel.data import MOMENTS, DataParallel
from megagnn.parallel.layers import is_sharded
from megagnn.parallel.megatron_compat import import_megatron, install_cpu_shim
from megagnn.parallel.pipeline import global_named_tensors
from megagnn.parallel.state import ParallelState

# buffers added after some checkpoints were written, and how to rebuild them from those
# checkpoints: the elements of the training split are those with a reference energy
DERIVED_BUFFERS = {"trained_elements": ("atomic_energies", lambda energies: energies != 0)}

LATEST = "latest"
BEST = "best"  # the checkpoint of the lowest validation loss (runs with validate.patience)

# one weight average: each parameter -> its averaged copy (training.ema.WeightAverage.shadow)
Average = dict[torch.Tensor, torch.Tensor]


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


def dist_checkpointing():
    """megatron-core's dist_checkpointing, usable in a plain single process too (it needs a
    process group: a one-rank gloo group over an in-memory store)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    install_cpu_shim()
    return import_megatron().dist_checkpointing


# -- what each rank holds -------------------------------------------------------------------
def placements(
    model: nn.Module,
    moments: dict[torch.Tensor, dict[str, torch.Tensor]] | None,
    sharded_moments: bool,
    par: ParallelState,
    average: Average | None = None,
) -> dict[str, tuple[torch.Tensor, list, tuple]]:
    """Global key -> (this rank's tensor, its offsets in the global tensor, replica id) for
    the weights and buffers (``model.*``), the AdamW moments (``optimizer.*``) and the
    weight average (``ema.*``). ``moments``: the AdamW moments of the parameters whose state
    this rank holds; ``sharded_moments``: each has one holder among the data-parallel ranks.

    Exactly one rank is the main replica of each piece: tensor-parallel slices are unique per
    TP rank, replicated weights are written by TP rank 0, buffers (present on every pipeline
    stage) by stage 0, all by data-parallel rank 0; a moment sharded over data-parallel
    ranks (ZeRO-1) by the rank that holds it.
    """
    held = moments or {}
    out: dict[str, tuple] = {}
    for key, module, name, tensor, is_param in global_named_tensors(model):
        if is_param and is_sharded(module, name):
            dim = module.partition_dim if tensor.dim() > 1 else 0
            offsets = [(dim, par.tp_rank, par.tp_size)]
            replica = (0, 0, par.dp_rank)
        else:
            offsets = []
            replica = (0 if is_param else par.pp_rank, par.tp_rank, par.dp_rank)
        out[f"model.{key}"] = (tensor, offsets, replica)
        if is_param and average is not None:
            out[f"ema.{key}"] = (average[tensor], offsets, replica)
        if tensor in held:
            owner = (*replica[:2], 0) if sharded_moments else replica
            for moment in MOMENTS:
                value = held[tensor].get(moment)  # none before the first step: zeros
                value = torch.zeros_like(tensor) if value is None else value
                out[f"optimizer.{key}.{moment}"] = (value, offsets, owner)
    return out


def global_shape(tensor: torch.Tensor, offsets: list) -> tuple[int, ...]:
    shape = list(tensor.shape)
    for dim, _, size in offsets:
        shape[dim] *= size
    return tuple(shape)


def sharded_state_dict(
    model: nn.Module,
    moments: dict[torch.Tensor, dict[str, torch.Tensor]] | None,
    sharded_moments: bool,
    par: ParallelState,
    average: Average | None = None,
) -> dict[str, Any]:
    """ShardedTensors of ``placements``, each under its global key."""
    from megatron.core.dist_checkpointing import ShardedTensor

    pieces = placements(model, moments, sharded_moments, par, average)
    return {
        key: ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=replica)
        for key, (tensor, offsets, replica) in pieces.items()
    }


def _optimizer_common(optimizer: DataParallel, device: torch.device) -> dict[str, Any]:
    """Hyperparameters and AdamW's step count (the same for every parameter; a rank may own
    no state yet, so the count is the maximum over ranks, reduced on the compute device:
    AdamW keeps the count on the host, which NCCL refuses)."""
    step = torch.tensor(optimizer.step_count(), device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"param_groups": groups, "step": float(step)}


def _restore_optimizer_common(optimizer: DataParallel, common: dict[str, Any]) -> None:
    for group, saved in zip(optimizer.param_groups, common["param_groups"], strict=True):
        group.update(saved)
    optimizer.set_step_count(common["step"])


# -- save ------------------------------------------------------------------------------------
def save(
    ckpt_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: DataParallel | None,
    common: dict[str, Any],
    par: ParallelState,
    keep: int = 2,
    best: bool = False,
    average: Average | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint folder; ``best``
    also points ``best`` at it (pruning never removes the best checkpoint)."""
    dc = dist_checkpointing()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / _tag(step)
    tmp = ckpt_dir / (_tag(step) + ".tmp")
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    moments = optimizer.moments() if optimizer is not None else None
    sharded = optimizer is not None and optimizer.moments_sharded
    state = sharded_state_dict(model, moments, sharded, par, average)
    if optimizer is not None:
        common = {**common, "optimizer": _optimizer_common(optimizer, par.device)}
    # rank 0 writes the common part; every rank passes rank 0's copy (RNG states may differ)
    box = [common]
    dist.broadcast_object_list(box, src=0)
    state["common"] = box[0]
    dc.save(state, str(tmp))
    dist.barrier()
    if par.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for name in (BEST, LATEST) if best else (LATEST,):
            pointer = ckpt_dir / (name + ".tmp")
            pointer.write_text(_tag(step))
            os.replace(pointer, ckpt_dir / name)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and p.suffix != ".tmp")
    best = ckpt_dir / BEST
    kept = {best.read_text().strip()} if best.is_file() else set()
    for old in done[:-keep] if keep > 0 else []:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


# -- find and load ---------------------------------------------------------------------------
def latest_checkpoint(ckpt_dir: str | Path, which: str = LATEST) -> Path | None:
    """The checkpoint ``latest`` (or ``best``) points at, or None if there is none."""
    pointer = Path(ckpt_dir) / which
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is missing or incomplete")
    return path


def resolve(path: str | Path, which: str = LATEST) -> Path:
    """A checkpoint folder from itself, a run folder or a checkpoints folder (its ``latest``,
    or its ``best`` where it has one)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    for candidate in (path / "checkpoints", path):
        if (candidate / which).is_file():
            return latest_checkpoint(candidate, which)
        if which == BEST and (candidate / LATEST).is_file():
            return latest_checkpoint(candidate)  # no validation-selected checkpoint
    if path.exists():
        raise CheckpointError(f"no complete checkpoint under {path}")
    raise CheckpointError(f"checkpoint {path} does not exist")


def verify(path: str | Path) -> None:
    """Raise CheckpointError naming the first file of checkpoint ``path`` that is missing,
    unreadable or shorter than the index says (a crash, a full disk or a partial copy cut
    it). Reads only the index and the files' sizes."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    index = path / ".metadata"
    if not index.is_file():
        raise CheckpointError(f"{index}: missing; {path} is not a complete checkpoint")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"{index}: corrupt ({_reason(e)}); the checkpoint is unreadable"
        ) from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        if (have := file.stat().st_size) < size:
            raise CheckpointError(
                f"{file}: truncated ({have:,} of {size:,} bytes); the checkpoint is corrupt"
            )


def _reason(error: BaseException) -> str:
    """One line of an error (torch's CheckpointException holds one traceback per rank)."""
    if isinstance(error, CheckpointException):
        failures = list(error.failures.values())
        if failures:
            error = failures[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def read_common(path: str | Path) -> dict[str, Any]:
    """The common part (config, step, schedule, ...) of a checkpoint, without its weights."""
    path = resolve(path)
    config = path / "metadata.json"
    try:  # megatron-core's own record of the format
        backend = json.loads(config.read_text())["sharded_backend"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config}: corrupt ({type(e).__name__}: {e})") from e
    if backend != "torch_dist":
        raise CheckpointError(f"{config}: format {backend!r}, not megagnn's 'torch_dist'")
    try:
        return dist_checkpointing().load_common_state_dict(str(path))["common"]
    except (Exception, CheckpointException) as e:  # truncated or foreign files raise many types
        if (path / ".metadata").exists():
            verify(path)  # a cut-short shard is named as such
        # megatron-core 0.16 writes common.pt; 0.19 keeps the common part among the shards
        where = path / "common.pt" if (path / "common.pt").exists() else path
        raise CheckpointError(f"{where}: corrupt or truncated ({_reason(e)})") from e


def tensors_metadata(path: str | Path) -> dict[str, Any]:
    """Global key -> shape and dtype of every tensor in checkpoint ``path``."""
    path = Path(path)
    try:
        return dist_checkpointing().load_tensors_metadata(str(path))
    except (Exception, CheckpointException) as e:
        verify(path)  # names the file at fault where it can
        raise CheckpointError(f"{path}: unreadable ({_reason(e)})") from e


def load(
    path: str | Path,
    model: nn.Module,
    optimizer: DataParallel | None,
    par: ParallelState,
    average: Average | None = None,
) -> dict[str, Any]:
    """Fill ``model`` (and ``optimizer`` and ``average``) with this rank's pieces of a
    checkpoint saved under any layout; returns the common dict. Collective under torchrun.
    A checkpoint saved without a weight average starts ``average`` at its weights."""
    dc = dist_checkpointing()
    path = resolve(path)
    # moments to load into, as after a first step
    moments = optimizer.moments(loading=True) if optimizer is not None else None
    sharded = optimizer is not None and optimizer.moments_sharded
    state = sharded_state_dict(model, moments, sharded, par, average)
    saved = set(tensors_metadata(path))
    fresh_average = average is not None and not any(k.startswith("ema.") for k in saved)
    if fresh_average:
        state = {k: v for k, v in state.items() if not k.startswith("ema.")}
    derived = _absent_derived(saved, state)
    loaded = load_raw(dc, state, path)
    with torch.no_grad():
        for key, sharded in state.items():
            if key != "common":
                sharded.data.copy_(loaded[key])
        for tensor, source, rule in derived.values():
            tensor.copy_(rule(loaded[source]))
        if fresh_average:
            for p, shadow in average.items():
                shadow.copy_(p)
    common = loaded["common"]
    if optimizer is not None:
        optimizer.loaded(moments)
        _restore_optimizer_common(optimizer, common["optimizer"])
    return common


def load_weights(
    path: str | Path,
    model: nn.Module,
    par: ParallelState,
    key_map: Callable[[str], str | None] = lambda key: key,
    average: bool = True,
) -> list[str]:
    """Fill this rank's weights and buffers from a checkpoint of any layout: the averaged
    weights where it has them (``average``), else the trained ones. ``key_map`` names the
    checkpoint tensor each global name loads from (None: leave it). Returns the names the
    checkpoint lacks, left as they were. Collective under torchrun."""
    from megatron.core.dist_checkpointing import ShardedTensor

    dc = dist_checkpointing()
    path = resolve(path)
    meta = tensors_metadata(path)
    wanted, targets, absent = {}, {}, []
    for key, (tensor, offsets, replica) in placements(model, None, False, par).items():
        name = key.removeprefix("model.")
        source = key_map(name)
        if source is None:
            continue
        saved = f"ema.{source}" if average and f"ema.{source}" in meta else f"model.{source}"
        rule = None
        if saved not in meta:
            derived = derived_from(saved)
            if derived is None or derived[0] not in meta:
                absent.append(name)
                continue
            saved, rule = derived
        if tuple(meta[saved].global_shape) != global_shape(tensor, offsets):
            raise CheckpointError(
                f"{path}: {saved} has shape {tuple(meta[saved].global_shape)}, this model's "
                f"{name} {global_shape(tensor, offsets)}; build the same architecture"
            )
        if saved not in wanted:  # each saved tensor is read once, whoever needs it
            into = torch.empty(tensor.shape, dtype=meta[saved].dtype, device=tensor.device)
            wanted[saved] = ShardedTensor.from_rank_offsets(
                saved, into, *offsets, replica_id=replica
            )
        targets[key] = (tensor, saved, rule)
    loaded = load_raw(dc, wanted, path)
    with torch.no_grad():
        for tensor, saved, rule in targets.values():
            tensor.copy_(loaded[saved] if rule is None else rule(loaded[saved]))
    return absent


def _absent_derived(saved: set[str], state: dict[str, Any]) -> dict[str, tuple]:
    """Removes from ``state`` the DERIVED_BUFFERS the checkpoint (keys ``saved``) predates;
    returns, for each, (the tensor to fill, the key it is rebuilt from, the rule)."""
    out = {}
    for key in [k for k in state if k.startswith("model.") and k not in saved]:
        derived = derived_from(key)
        if derived is not None and derived[0] in saved:
            out[key] = (state.pop(key).data, *derived)
    return out


def derived_from(key: str) -> tuple[str, Any] | None:
    """(source key, rule) rebuilding the DERIVED_BUFFERS entry ``key`` names, or None."""
    prefix, _, name = key.rpartition(".")
    if name not in DERIVED_BUFFERS:
        return None
    source, rule = DERIVED_BUFFERS[name]
    return (f"{prefix}.{source}" if prefix else source), rule


def load_raw(dc, sharded: dict[str, Any], path: Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` with a readable error."""
    try:
        with warnings.catch_warnings():  # megatron-core calls a deprecated torch loader
            warnings.filterwarnings("ignore", "`load_state_dict` is deprecated", FutureWarning)
            return dc.load(sharded, str(path))
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        verify(path)  # a corrupt file is named as such
        raise CheckpointError(f"cannot load {path} into this model: {_reason(e)}") from e


def read_tensor(path: Path, key: str, meta, device: torch.device | str = "cpu") -> torch.Tensor:
    """One whole global tensor, assembled from the shards that hold it, on ``device`` (the
    communication device when every rank of a job reads it: one of them is its main
    replica)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    dc = dist_checkpointing()
    target = torch.empty(meta.global_shape, dtype=meta.dtype, device=device)
    rank = dist.get_rank()  # dist_checkpointing() made a group if there was none
    wanted = {key: ShardedTensor.from_rank_offsets(key, target, replica_id=rank)}
    return load_raw(dc, wanted, path)[key]


class TensorReader:
    """Whole global tensors of one checkpoint, one at a time, for a single process (the
    consolidation's streaming read): torch.distributed.checkpoint reads each saved shard
    straight into the assembled tensor, with the checkpoint's index read once. Holds the
    tensor and one saved shard at a time (megatron-core's load also rereads the index per
    call: 2.04x the largest tensor where this took 1.95x, for a 1B model saved at TP=2)."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        class Cached(FileSystemReader):
            def read_metadata(self):
                if not hasattr(self, "_index"):
                    self._index = super().read_metadata()
                return self._index

        self.reader = Cached(str(path))
        self.path = Path(path)

    def read(self, key: str, meta) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        target = torch.empty(meta.global_shape, dtype=meta.dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({key: target}, storage_reader=self.reader, no_dist=True)
        except (Exception, CheckpointException) as e:
            verify(self.path)  # a corrupt file is named as such
            raise CheckpointError(f"cannot read {key} from {self.path}: {_reason(e)}") from e
        return target
