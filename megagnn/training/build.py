"""What every rank builds before training: its part of the model and its optimizer, with
frozen parameters and per-module learning rates (μP's and the configured multipliers)."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch

from megagnn.config import Config, ConfigError, ModelConfig, OptimConfig
from megagnn.models import Potential, build_model
from megagnn.models.mup import MupScales, mup_scales
from megagnn.parallel.data import DataParallel, FlatDataParallel, uses_megatron
from megagnn.parallel.materialize import materialize
from megagnn.parallel.pipeline import PipelineStage, global_named_tensors, schedule_config
from megagnn.parallel.state import ParallelState
from megagnn.parallel.tensor import parallelize_tensor
from megagnn.precision import DTYPES


@dataclass(frozen=True)
class ModelSpec:
    """The whole model as every rank knows it before holding any piece of it: one build on
    the meta device (μP adds one at its base width), read for names, size and scales."""

    model: Potential
    """The whole model on the meta device (unsharded; ``build_rank_model`` cuts a copy)."""
    names: list[str]
    """Every parameter's global name."""
    parameters: int
    """Parameter count of the whole model."""
    mup: MupScales
    """μP's learning-rate and initialisation multipliers (empty under model.parametrization=sp)."""

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelSpec:
        model = build_model(cfg, device="meta")
        names = [name for name, _ in model.named_parameters()]
        count = sum(p.numel() for p in model.parameters())
        return cls(model, names, count, mup_scales(cfg, model))


def build_rank_model(
    cfg: Config, par: ParallelState, dtype: torch.dtype, spec: ModelSpec | None = None
) -> tuple[Potential, PipelineStage | None]:
    """The model as this rank holds it: the spec's meta-device model, cut over the
    tensor-parallel group, wrapped as this rank's pipeline stage, then only this rank's
    part allocated. Returns the (cut) potential and the stage, None without pipeline
    parallelism."""
    spec = spec or ModelSpec.of(cfg.model)
    model = copy.deepcopy(spec.model)  # meta tensors: nothing is allocated
    model.recompute_activations = cfg.train.recompute_activations
    potential = parallelize_tensor(model, par.tp_group, cfg.parallel.node_parallel)
    pipeline = PipelineStage(potential, par, dtype) if par.pp_size > 1 else None
    materialize(pipeline or potential, cfg.train.seed, init_scale=spec.mup.init)
    return potential, pipeline


def size_warning(cfg: Config, spec: ModelSpec) -> str | None:
    """A warning when model.family is not the family the named size was made for (the
    widths of one family give another a different parameter count)."""
    sized_for = cfg.model.sized_for
    if sized_for is None or sized_for == cfg.model.family:
        return None
    return (
        f"model.family={cfg.model.family} with a size made for {sized_for}: "
        f"{spec.parameters:,} parameters, not the size's nominal count; use "
        f"configs/model/{cfg.model.family}-*.yaml (or set model.sized_for=null to silence this)"
    )


def _check_patterns(patterns: list[str], names: list[str], field: str) -> None:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(
                f"{field}: {pattern!r} matches no parameter; names look like "
                f"{names[0]!r}, {names[-1]!r} (see model.named_parameters())"
            )


def freeze(cfg: Config, model: torch.nn.Module, spec: ModelSpec) -> int:
    """Stop the parameters finetune.freeze names from training; returns how many, over the
    whole model (a rank may hold none of them)."""
    patterns, names = cfg.finetune.freeze, spec.names
    _check_patterns(patterns, names, "finetune.freeze")
    for full, _, _, tensor, is_param in global_named_tensors(model):
        if is_param and any(fnmatch.fnmatch(full, p) for p in patterns):
            tensor.requires_grad_(False)
    return sum(any(fnmatch.fnmatch(n, p) for p in patterns) for n in names)


def _configured(optim: OptimConfig) -> list[tuple[str, float]]:
    return [(p, float(f)) for p, _, f in (e.rpartition("=") for e in optim.lr_multipliers)]


def lr_multiplier(cfg: Config, name: str, mup: dict[str, float]) -> float:
    """A parameter's learning rate over optim.lr: μP's factor times the first matching
    optim.lr_multipliers entry."""
    factor = next((f for p, f in _configured(cfg.optim) if fnmatch.fnmatch(name, p)), 1.0)
    return mup.get(name, 1.0) * factor


def build_rank_optimizer(
    cfg: Config,
    model: torch.nn.Module,
    par: ParallelState,
    spec: ModelSpec,
    dtype: torch.dtype | None = None,
) -> DataParallel:
    """AdamW over this rank's trainable parameters, with the data parallelism that
    parallel.data_parallel picks (state sharded over data parallel if configured). One
    parameter group per learning-rate multiplier, the same groups on every rank (some
    empty), so optimizer state saved under one layout loads under another."""
    mup = spec.mup.lr
    _check_patterns([p for p, _ in _configured(cfg.optim)], spec.names, "optim.lr_multipliers")
    trainable = [
        (full, tensor)
        for full, _, _, tensor, is_param in global_named_tensors(model)
        if is_param and tensor.requires_grad
    ]
    if not mup and not cfg.optim.lr_multipliers:
        params = [tensor for _, tensor in trainable]
    else:
        # every product a rank could meet, from the config alone: identical on all ranks
        factors = {1.0, *mup.values()}
        configured = {f for _, f in _configured(cfg.optim)}
        factors = {m * f for m in factors for f in {1.0, *configured}}
        multipliers = [1.0, *sorted(factors - {1.0})]  # group 0: the base lr
        groups = {m: [] for m in multipliers}
        for full, tensor in trainable:
            groups[lr_multiplier(cfg, full, mup)].append(tensor)
        params = [{"params": groups[m], "lr": cfg.optim.lr * m} for m in multipliers]
    optim = cfg.optim
    if uses_megatron(cfg, par.device, par.dp_size):
        from megagnn.parallel.megatron_ddp import MegatronDataParallel

        return MegatronDataParallel(
            model,
            params,
            optim.lr,
            optim.weight_decay,
            schedule_config(par, dtype or DTYPES[cfg.train.precision]),
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            bucket_size=cfg.parallel.bucket_size,
        )
    return FlatDataParallel(
        model,
        params,
        optim.lr,
        optim.weight_decay,
        tp_group=par.tp_group,
        pp_group=par.pp_group,
        dp_group=par.dp_group,
        shard=cfg.parallel.shard_optimizer,
    )
