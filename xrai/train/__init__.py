"""Training: ``fit`` (one process or torchrun's many), ``launch`` (torchrun from a notebook), grouped
cross-validation, the loss and EMA, experiment tracking."""

from xrai.train.cv import cross_validate
from xrai.train.launcher import launch
from xrai.train.trainer import FitResult, TrainingDivergedError, fit, load_result

__all__ = ["FitResult", "TrainingDivergedError", "cross_validate", "fit", "launch", "load_result"]
