"""`OptunaPruning`: stop an Optuna trial whose per-epoch validation score is hopeless."""

from __future__ import annotations

import math

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from visioncare.errors import ConfigurationError


class OptunaPruning(Callback):
    """Report ``monitor`` to the trial after each validation epoch of `fit`; prune if told to.

    Our own few lines instead of optuna-integration's callback: one dependency less, and it
    reports only during `fit` (never the sanity check or the best weights' re-validation after
    training, which would report a second value for the last epoch). The score is taken when
    validation ends and reported at the end of the training epoch, after the epoch's
    metrics.csv row and checkpoints are written, so a pruned trial's run directory shows the
    epochs it trained. Raising `TrialPruned` ends `trainer.fit`; Lightning runs its exception
    hooks and re-raises it to the objective.

    Args:
        trial: the running trial.
        monitor: the logged metric the study optimises (best per trial), e.g. ``val/avg_acc``.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor
        self._score: tuple[int, float] | None = None  # (epoch, value) of this epoch's validation

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
            raise ConfigurationError(
                f"optimized_metric={self.monitor} is not logged by validation, so the search "
                f"can neither prune nor score a trial; use one of: {', '.join(logged)}"
            )
        value = trainer.callback_metrics[self.monitor]
        if math.isfinite(float(value)):
            self._score = (trainer.current_epoch, float(value))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._score is None:  # no validation this epoch (check_val_every_n_epoch > 1)
            return
        (epoch, value), self._score = self._score, None
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor}={value:.4f}")
