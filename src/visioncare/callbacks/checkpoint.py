"""Checkpoints: `best.ckpt` by the mean of the two tasks' validation accuracy, and `last.ckpt`.

`BestAverageAccuracy` keeps the epoch with the highest `val/avg_acc`; ties go to the higher mean
macro-F1 (`val/f1_dr`, `val/f1_dme`). It holds its best score in `state_dict`, so a resumed run
never lets a worse epoch replace `best.ckpt`. `LastCheckpoint` writes the full training state every
epoch. Both write atomically (temporary file, fsync, rename): a kill during a save leaves the
previous file intact.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from visioncare.scoring.metrics import mean_f1


def save_checkpoint_atomically(trainer: L.Trainer, path: Path) -> None:
    """`trainer.save_checkpoint` to a temporary file, then rename it over ``path`` (rank 0)."""
    tmp = path.with_name(f".{path.name}.tmp")
    # Full training state (not weights only). Collective under DDP: every rank calls it.
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    trainer.strategy.barrier("visioncare_checkpoint_saved")


class BestAverageAccuracy(Checkpoint):
    """Save `best.ckpt` whenever `val/avg_acc` improves (ties: higher mean macro-F1).

    Args:
        dirpath: the checkpoint folder (`<run>/checkpoints`).
        filename: file name of the best checkpoint.
        monitor: the selection metric; higher is better.
    """

    def __init__(
        self, dirpath: str, filename: str = "best.ckpt", monitor: str = "val/avg_acc"
    ) -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.monitor = monitor
        self.best_score = -math.inf
        self.best_tiebreak = -math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}

    @property
    def best_model_path(self) -> str:
        return str(self.dirpath / self.filename) if self.best_epoch >= 0 else ""

    def is_better(self, score: float, tiebreak: float) -> bool:
        """Lexicographic (avg_acc, mean F1) comparison; NaN never wins."""
        if math.isnan(score):
            return False
        tiebreak = -math.inf if math.isnan(tiebreak) else tiebreak
        if score != self.best_score:
            return score > self.best_score
        return tiebreak > self.best_tiebreak

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if self.monitor not in metrics:
            raise KeyError(
                f"BestAverageAccuracy monitors {self.monitor!r}, which was not logged; "
                f"logged: {sorted(metrics)}"
            )
        score, tiebreak = metrics[self.monitor], mean_f1(metrics, "val")
        if not self.is_better(score, tiebreak):
            return
        self.best_score, self.best_tiebreak = score, tiebreak
        self.best_epoch = trainer.current_epoch
        self.best_metrics = metrics
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_checkpoint_atomically(trainer, self.dirpath / self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_tiebreak": self.best_tiebreak,
            "best_epoch": self.best_epoch,
            "best_metrics": dict(self.best_metrics),
            "monitor": self.monitor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict["best_score"]
        self.best_tiebreak = state_dict["best_tiebreak"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_metrics = dict(state_dict["best_metrics"])


class LastCheckpoint(Checkpoint):
    """Save `last.ckpt` with the full training state at the end of every training epoch.

    Runs after `BestAverageAccuracy` and early stopping (Lightning calls checkpoint callbacks
    last, in list order), so the file carries their updated state.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_checkpoint_atomically(trainer, self.dirpath / self.filename)
