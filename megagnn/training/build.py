"""What every rank builds before training: its part of the model and its optimizer, with
frozen parameters and per-module learning rates (μP's and the configured multipliers)."""

from __future__ import annotations

import fnmatch

import torch

from megagnn.config import Config, ConfigError, TrainConfig
from megagnn.models import Potential, build_model
from megagnn.models.mup import mup_scales
from megagnn.parallel.data import DataParallel, FlatDataParallel, uses_megatron
from megagnn.parallel.materialize import materialize
from megagnn.parallel.pipeline import PipelineStage, global_named_tensors, schedule_config
from megagnn.parallel.state import ParallelState
from megagnn.parallel.tensor import parallelize_tensor
from megagnn.precision import DTYPES


def build_rank_model(
    cfg: Config, par: ParallelState, dtype: torch.dtype
) -> tuple[Potential, PipelineStage | None]:
    """The model as this rank holds it: built on the meta device, cut over the tensor-parallel
    group, wrapped as this rank's pipeline stage, then only this rank's part allocated.
    Returns the (cut) potential and the stage, None without pipeline parallelism."""
    model = build_model(cfg.model, device="meta")
    model.recompute_activations = cfg.train.recompute_activations
    potential = parallelize_tensor(model, par.tp_group, cfg.parallel.node_parallel)
    pipeline = PipelineStage(potential, par, dtype) if par.pp_size > 1 else None
    materialize(pipeline or potential, cfg.train.seed, init_scale=mup_scales(cfg.model).init)
    return potential, pipeline


def size_warning(cfg: Config) -> str | None:
    """A warning when model.family is not the family the named size was made for (the
    widths of one family give another a different parameter count)."""
    sized_for = cfg.model.sized_for
    if sized_for is None or sized_for == cfg.model.family:
        return None
    count = sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())
    return (
        f"model.family={cfg.model.family} with a size made for {sized_for}: {count:,} "
        f"parameters, not the size's nominal count; use configs/model/{cfg.model.family}-*.yaml "
        "(or set model.sized_for=null to silence this)"
    )


def parameter_names(cfg: Config) -> list[str]:
    """Every parameter's name in the whole (unsharded) model, whatever this rank holds."""
    return [name for name, _ in build_model(cfg.model, device="meta").named_parameters()]


def _check_patterns(patterns: list[str], names: list[str], field: str) -> None:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(
                f"train.{field}: {pattern!r} matches no parameter; names look like "
                f"{names[0]!r}, {names[-1]!r} (see model.named_parameters())"
            )


def freeze(cfg: Config, model: torch.nn.Module) -> int:
    """Stop the parameters train.freeze names from training; returns how many, over the
    whole model (a rank may hold none of them)."""
    patterns, names = cfg.train.freeze, parameter_names(cfg)
    _check_patterns(patterns, names, "freeze")
    for full, _, _, tensor, is_param in global_named_tensors(model):
        if is_param and any(fnmatch.fnmatch(full, p) for p in patterns):
            tensor.requires_grad_(False)
    return sum(any(fnmatch.fnmatch(n, p) for p in patterns) for n in names)


def _configured(train: TrainConfig) -> list[tuple[str, float]]:
    return [(p, float(f)) for p, _, f in (e.rpartition("=") for e in train.lr_multipliers)]


def lr_multiplier(cfg: Config, name: str, mup: dict[str, float]) -> float:
    """A parameter's learning rate over train.lr: μP's factor times the first matching
    train.lr_multipliers entry."""
    factor = next((f for p, f in _configured(cfg.train) if fnmatch.fnmatch(name, p)), 1.0)
    return mup.get(name, 1.0) * factor


def build_rank_optimizer(
    cfg: Config, model: torch.nn.Module, par: ParallelState, dtype: torch.dtype | None = None
) -> DataParallel:
    """AdamW over this rank's trainable parameters, with the data parallelism that
    parallel.data_parallel picks (state sharded over data parallel if configured). One
    parameter group per learning-rate multiplier, the same groups on every rank (some
    empty), so optimizer state saved under one layout loads under another."""
    mup = mup_scales(cfg.model).lr
    _check_patterns([p for p, _ in _configured(cfg.train)], parameter_names(cfg), "lr_multipliers")
    trainable = [
        (full, tensor)
        for full, _, _, tensor, is_param in global_named_tensors(model)
        if is_param and tensor.requires_grad
    ]
    if not mup and not cfg.train.lr_multipliers:
        params = [tensor for _, tensor in trainable]
    else:
        # every product a rank could meet, from the config alone: identical on all ranks
        factors = {1.0, *mup.values()}
        factors = {m * f for m in factors for f in {1.0, *(f for _, f in _configured(cfg.train))}}
        multipliers = [1.0, *sorted(factors - {1.0})]  # group 0: the base lr
        groups = {m: [] for m in multipliers}
        for full, tensor in trainable:
            groups[lr_multiplier(cfg, full, mup)].append(tensor)
        params = [{"params": groups[m], "lr": cfg.train.lr * m} for m in multipliers]
    train = cfg.train
    if uses_megatron(cfg, par.device, par.dp_size):
        from megagnn.parallel.megatron_ddp import MegatronDataParallel

        return MegatronDataParallel(
            model,
            params,
            train.lr,
            train.weight_decay,
            schedule_config(par, dtype or DTYPES[train.precision]),
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            bucket_size=cfg.parallel.bucket_size,
        )
    return FlatDataParallel(
        model,
        params,
        train.lr,
        train.weight_decay,
        tp_group=par.tp_group,
        pp_group=par.pp_group,
        dp_group=par.dp_group,
        shard=train.shard_optimizer,
    )
