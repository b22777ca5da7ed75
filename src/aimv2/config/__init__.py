"""Typed run configuration: one YAML file plus dotted ``key=value`` overrides (parse.py), the sections and their
defaults (schema.py), and the rules a config must satisfy (checks.py)."""

from .checks import ConfigError, validate
from .parse import REQUIRED, apply_override, load_config
from .schema import (
    ClipConfig,
    Config,
    DataConfig,
    DistillConfig,
    LitConfig,
    LitTowerConfig,
    LogConfig,
    ModelConfig,
    NativeConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "REQUIRED",
    "ClipConfig",
    "DistillConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LitConfig",
    "LitTowerConfig",
    "LogConfig",
    "ModelConfig",
    "NativeConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_override",
    "load_config",
    "validate",
]
