"""Typed configuration: the schema (dataclasses), loading (YAML + overrides) and validation.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=10"])
"""

from samdiffsr.config.loading import config_from_dict, deep_merge, load_config, parse_override, save_config
from samdiffsr.config.schema import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from samdiffsr.config.validation import validate

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "config_from_dict",
           "deep_merge", "load_config", "parse_override", "save_config", "validate"]
