"""The network, its multi-task losses and the LightningModule."""

from visioncare.models.loss import FixedWeightLoss, UncertaintyWeightedLoss
from visioncare.models.module import VisionCareModule
from visioncare.models.net import TwoHeadNet

__all__ = ["FixedWeightLoss", "TwoHeadNet", "UncertaintyWeightedLoss", "VisionCareModule"]
