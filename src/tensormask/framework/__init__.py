"""The experiment framework: Lightning module and data module, checkpoints, loggers, config checks."""

from tensormask.framework import resolvers  # noqa: F401  (registers the config resolvers)
from tensormask.framework.checkpoint_io import AtomicCheckpointIO, resolve_ckpt_path
from tensormask.framework.datamodule import DetectionDataModule
from tensormask.framework.lit_module import DetectionLitModule
from tensormask.framework.validation import ConfigError, validate_config

__all__ = [
    "AtomicCheckpointIO",
    "ConfigError",
    "DetectionDataModule",
    "DetectionLitModule",
    "resolve_ckpt_path",
    "validate_config",
]
