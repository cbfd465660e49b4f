"""Lightning callbacks: gradual unfreezing, checkpoint selection, per-epoch statistics."""

from visioncare.callbacks.checkpoint import BestAverageAccuracy, LastCheckpoint
from visioncare.callbacks.epoch_stats import EpochMetricsCSV, EpochStats
from visioncare.callbacks.run_config import RunConfigRecord
from visioncare.callbacks.unfreeze import GradualUnfreezing

__all__ = [
    "BestAverageAccuracy",
    "EpochMetricsCSV",
    "EpochStats",
    "GradualUnfreezing",
    "LastCheckpoint",
    "RunConfigRecord",
]
