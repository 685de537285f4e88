"""One typed config tree: dataclasses filled from YAML and ``--set a.b=c`` overrides.

A YAML file may start with ``include: [other.yaml, ...]`` (paths relative to the file);
included files are merged first, in order, and the file's own keys win. An unknown key
anywhere is an error, never ignored.

``sections`` holds one dataclass per concern (model, data, train, ...); ``tree`` holds the
``Config`` that joins them, its cross-section checks, and the YAML loading.
"""

from megagnn.config.sections import (
    ACCELERATORS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DatasetSource,
    FinetuneConfig,
    KernelConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    ValidateConfig,
    parse_duration,
)
from megagnn.config.tree import (
    MOVED,
    Config,
    config_from_dict,
    config_to_dict,
    field_help,
    load_config,
    load_yaml,
    parse_override,
    upgrade_saved,
)

__all__ = [
    "ACCELERATORS",
    "MOVED",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetSource",
    "FinetuneConfig",
    "KernelConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "ValidateConfig",
    "config_from_dict",
    "config_to_dict",
    "field_help",
    "load_config",
    "load_yaml",
    "parse_duration",
    "parse_override",
    "upgrade_saved",
]
