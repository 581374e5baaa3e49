"""The configuration of a SimPO run: sections, flags and YAML, validation.

- ``sections``: one frozen dataclass per concern (``ModelConfig``, ``ParallelConfig``,
  ``DataConfig``, ``LossConfig``, ``OptimizerConfig``, ``CheckpointConfig``,
  ``LoggingConfig``, ``MemoryConfig``) and ``SimPOConfig``, which holds one of each.
- ``loader``: Megatron-LM-named flags (``build_parser``), ``--config FILE.yaml``
  (``read_yaml``), both into a SimPOConfig (``load_config``).
- ``validation``: every rule the settings obey, checked once at start
  (``SimPOConfig.validate(world_size)``), with messages that name the flags.
"""

from simpo_megatron.config.loader import build_parser, load_config, read_yaml
from simpo_megatron.config.sections import (
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LossConfig,
    MemoryConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    SimPOConfig,
    flag,
)
from simpo_megatron.config.validation import validate

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "SimPOConfig",
    "build_parser",
    "flag",
    "load_config",
    "read_yaml",
    "validate",
]
