"""The config tree and how it is filled: YAML files (with includes) and ``--set a.b=c``
overrides are merged into one mapping, then checked against the section dataclasses field by
field. An unknown key anywhere is an error, never ignored; a key that moved names its new
place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megagnn.config.sections import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    KernelConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    ValidateConfig,
)

MOVED = {
    **{f"train.{k}": f"optim.{k}" for k in ("lr", "min_lr_ratio", "warmup_steps")},
    **{f"train.{k}": f"optim.{k}" for k in ("weight_decay", "grad_clip", "lr_multipliers")},
    "train.ema_decay": "optim.ema_decay",
    **{f"train.{k}": f"loss.{k}" for k in ("energy_weight", "force_weight", "stress_weight")},
    "train.loss": "loss.function",
    "train.eval_every": "validate.every",
    "train.eval_structures": "validate.structures",
    "train.patience": "validate.patience",
    "train.save_every": "checkpoint.every",
    "train.save_every_s": "checkpoint.every_s",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.resume": "checkpoint.resume",
    **{f"train.{k}": f"finetune.{k}" for k in ("init_from", "init_heads", "freeze")},
    "train.kernels": "kernels.backend",
    "train.kernel_dot": "kernels.dot",
    "train.kernel_autotune": "kernels.autotune",
    "train.shard_optimizer": "parallel.shard_optimizer",
}
"""Keys that moved when the training section was split: old dotted key -> new one. A config
that uses an old key is refused with the new name; configs saved with runs are upgraded."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the data is and how it is batched."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The run: its folder, length, precision, seed and logging."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, the learning-rate schedule, clipping and the weight average."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss terms and their weights."""
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    """Validation during training and early stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save, how many to keep, whether to resume."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Starting from a pretrained model: weights, heads, frozen parameters."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Fused Triton kernels or the PyTorch references."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline layout; data parallelism takes the remaining processes."""

    def __post_init__(self) -> None:
        for source in self.data.datasets:
            if source.head not in self.model.heads:
                raise ConfigError(
                    f"data.datasets: {source.path} trains head {source.head!r}, which is not "
                    f"in model.heads={self.model.heads}; add it there"
                )
        if self.parallel.data_parallel == "megatron":
            if self.train.precision == "fp64":
                raise ConfigError(
                    "parallel.data_parallel=megatron: megatron-core's DistributedOptimizer "
                    "takes fp32 and bf16 weights, not fp64; use parallel.data_parallel=flat "
                    "or train.precision=fp32"
                )
            if not self.parallel.shard_optimizer:
                raise ConfigError(
                    "parallel.data_parallel=megatron shards the optimizer state; with "
                    "parallel.shard_optimizer=false use parallel.data_parallel=flat"
                )
        pipeline = self.parallel.pipeline
        if pipeline > 1 and self.model.forces == "conservative":
            raise ConfigError(
                "parallel.pipeline > 1 cannot train conservative forces (F = -dE/dx needs the "
                "position gradient through every stage inside the forward pass). Use "
                "model.forces=direct model.stress=false (or model.forces=none), or "
                "parallel.tensor instead of parallel.pipeline"
            )
        if self.train.compile and (pipeline > 1 or self.parallel.node_parallel):
            raise ConfigError(
                "train.compile=true traces tensor-parallel layers but not pipeline stages or "
                "node-parallel regions yet: set parallel.pipeline=1 and "
                "parallel.node_parallel=false, or train.compile=false"
            )
        if self.train.compile and self.train.recompute_activations:
            raise ConfigError(
                "train.compile=true and train.recompute_activations=true: in the compiled "
                "graph Inductor chooses what to recompute; set one of them false"
            )
        if pipeline > self.model.layers:
            raise ConfigError(
                f"parallel.pipeline={pipeline} stages need at least as many blocks; "
                f"model.layers={self.model.layers}"
            )


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a valid {tp}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _moved(prefix: str) -> set[str]:
    """The keys of one section (``prefix``: 'train.') that have moved elsewhere."""
    return {k.removeprefix(prefix) for k in MOVED if k.startswith(prefix)}


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    prefix = f"{where}." if where else ""
    moved = [f"{prefix}{k} is now {MOVED[prefix + k]}" for k in sorted(unknown & _moved(prefix))]
    if moved:
        raise ConfigError("moved config key(s): " + "; ".join(moved) + " (write the new name)")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
            f"known keys{' of ' + where if where else ''}: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file with its includes resolved into one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: {problem} (YAML)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    merged: dict = {}
    for inc in raw.pop("include", []) or []:
        merged = _merge(merged, load_yaml(path.parent / inc))
    return _merge(merged, raw)


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    node: Any = yaml.safe_load(value) if value.strip() else None
    for p in reversed(parts):
        node = {p: node}
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config tree from an optional YAML file and dotted overrides."""
    values = load_yaml(path) if path is not None else {}
    for text in overrides or []:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def upgrade_saved(values: dict) -> dict:
    """A config dict saved by an older megagnn, with the keys moved since (MOVED) under
    their new names."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in MOVED.items():
        section, key = old.split(".")
        if key in out.get(section, {}):
            into, name = new.split(".")
            out.setdefault(into, {})[name] = out[section].pop(key)
    return out


def field_help() -> str:
    """Every config field as ``section.name (type, default): docstring``, read from the
    dataclasses' attribute docstrings (``pretrain --help``)."""
    import ast
    import inspect
    import textwrap

    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = {}
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
        lines.append(f"{section.name}:")
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = str(f.type).replace("typing.", "")
            default = getattr(defaults, f.name)
            lines.append(f"  {section.name}.{f.name} ({tp}, default {default!r})")
            indent = " " * 6
            text = docs.get(f.name, "")
            lines += textwrap.wrap(text, 88, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(lines)
