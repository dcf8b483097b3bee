"""The run configuration: its schema (`schema`, pure nested dataclasses), the trajectory rules
that decide whether a resume may proceed (`trajectory`, pure), and the loader of YAML files with
`--set` overrides (`loader`).

May import: core, PyYAML (the loader only).
"""

from .loader import config_from_dict, load_config
from .schema import (
                     CheckpointConfig,
                     Config,
                     DataConfig,
                     ModelConfig,
                     MonitorConfig,
                     PlacementConfig,
                     PreemptionConfig,
                     SlurmConfig,
                     TrainConfig,
)
from .trajectory import TRAJECTORY_KEYS, trajectory_changes

__all__ = ["CheckpointConfig", "Config", "DataConfig", "ModelConfig", "MonitorConfig",
           "PlacementConfig", "PreemptionConfig", "SlurmConfig", "TRAJECTORY_KEYS", "TrainConfig",
           "config_from_dict", "load_config", "trajectory_changes"]
