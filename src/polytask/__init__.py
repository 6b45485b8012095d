"""polytask: multi-task learning for PyTorch.

Train one network on many tasks with balanced gradients (:mod:`polytask.balance`), analyse how
tasks help or hurt each other (:mod:`polytask.analyze`) and merge models fine-tuned per task
(:mod:`polytask.merge`).

This module stays import-light (no torch) so that ``polytask --help`` starts fast; import the
subpackages for the real work.
"""

from polytask.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MergeError,
    PolytaskError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "PolytaskError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
    "MergeError",
]
