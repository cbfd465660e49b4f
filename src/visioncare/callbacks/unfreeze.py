"""Gradual unfreezing of the backbone, as a pure function of the epoch.

Schedule (``unfreeze_step = s``; stage = ``epoch // s``, capped at 3):

    stage 0  epochs 0 .. s-1      heads (and the loss's log-variances) only; backbone frozen
    stage 1  epochs s .. 2s-1     + the top 25 % of the backbone's blocks
    stage 2  epochs 2s .. 3s-1    + the top 50 %
    stage 3  epochs 3s ..         everything

With ``unfreeze_step=5``: epochs 0-4 heads, 5-9 top 25 %, 10-14 top 50 %, 15+ all.
``unfreeze_step=0`` turns gradual unfreezing off: everything trains from the first epoch.

The stage is derived from the epoch at every epoch start and applied from scratch, so a resumed run
lands in the right stage with no extra state (unlike Lightning's `BaseFinetuning`, which re-freezes
on resume). Only `requires_grad` changes; the optimizer's parameter groups all exist from the first
step (see `VisionCareModule.parameter_groups`). Frozen BatchNorm layers stay in eval mode
(`TwoHeadNet.train`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from visioncare.errors import ConfigurationError
from visioncare.models.net import UNFREEZE_FRACTIONS

MAX_STAGE = 3


class GradualUnfreezing(Callback):
    """Freeze the backbone, then unfreeze it top-down in stages every ``unfreeze_step`` epochs.

    Args:
        unfreeze_step: epochs per stage; 0 disables (all trainable from the start).
        fractions: trainable share of backbone blocks (counted from the top) at stages 0..3;
            the default is the schedule the optimizer's groups are built for (tests may pass
            others).
    """

    def __init__(
        self, unfreeze_step: int = 5, fractions: tuple[float, ...] = UNFREEZE_FRACTIONS
    ) -> None:
        if unfreeze_step < 0:
            raise ConfigurationError(f"unfreeze_step must be >= 0, got {unfreeze_step}")
        if len(fractions) != MAX_STAGE + 1 or list(fractions) != sorted(fractions):
            raise ConfigurationError(
                f"unfreezing fractions must be {MAX_STAGE + 1} increasing values, got {fractions}"
            )
        self.unfreeze_step = unfreeze_step
        self.fractions = tuple(float(f) for f in fractions)

    def stage_at(self, epoch: int) -> int:
        """The unfreezing stage of an epoch (3 = fully trainable)."""
        if self.unfreeze_step == 0:
            return MAX_STAGE
        return min(epoch // self.unfreeze_step, MAX_STAGE)

    def apply(self, pl_module: L.LightningModule, stage: int) -> float:
        """Set `requires_grad` for ``stage``; return the trainable share of backbone parameters."""
        net = pl_module.net
        for param in net.backbone.parameters():
            param.requires_grad_(False)
        for param in net.top_blocks(self.fractions[stage]):
            param.requires_grad_(True)
        # Re-apply the mode so BatchNorm of frozen blocks goes to eval, of unfrozen back to train.
        net.train(pl_module.training)
        total = sum(p.numel() for p in net.backbone.parameters())
        trainable = sum(p.numel() for p in net.backbone.parameters() if p.requires_grad)
        return trainable / total if total else 1.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Also before the sanity check / first validation, so nothing runs in a stale stage.
        self.apply(pl_module, self.stage_at(trainer.current_epoch))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = self.stage_at(trainer.current_epoch)
        fraction = self.apply(pl_module, stage)
        pl_module.log("unfreeze/stage", float(stage), on_step=False, on_epoch=True)
        pl_module.log("unfreeze/trainable_fraction", fraction, on_step=False, on_epoch=True)
