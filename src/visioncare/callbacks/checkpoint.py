"""Checkpoints: `best.ckpt` by the mean of the two tasks' validation accuracy, and `last.ckpt`.

`BestAverageAccuracy` keeps the epoch with the highest `val/avg_acc`; ties go to the higher mean
macro-F1 (`val/f1_dr`, `val/f1_dme`). It holds its best score in `state_dict`, so a resumed run
never lets a worse epoch replace `best.ckpt`; it is Lightning's `ModelCheckpoint` plus that
tie-break. `LastCheckpoint` writes the full training state every epoch (a plain `Checkpoint`:
`ModelCheckpoint(save_last=True)` writes `last.ckpt` only at steps where a top-k save happened or
as a link, so "every epoch, after the best file and early stopping" is shorter said directly).
Both write atomically (temporary file, fsync, rename; Lightning's checkpoint IO writes in place):
a kill during a save leaves the previous file intact.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from torch import Tensor

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


class BestAverageAccuracy(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` keeping one `best.ckpt` by `val/avg_acc` (higher is better).

    What is ours is only the tie-break: an epoch that equals the best `val/avg_acc` replaces it
    when its mean macro-F1 is higher (`scoring.metrics.mean_f1`), and a NaN score never wins
    (Lightning would save a NaN first epoch). The best epoch, its validation metrics and the
    tie-break score travel in `state_dict` beside Lightning's own, so a resumed run never lets
    a worse epoch replace `best.ckpt`. Writes go through `save_checkpoint_atomically`, because
    Lightning's checkpoint IO writes the file in place.

    Args:
        dirpath: the checkpoint folder (`<run>/checkpoints`).
        filename: file name of the best checkpoint.
        monitor: the selection metric; higher is better.
    """

    def __init__(
        self, dirpath: str, filename: str = "best.ckpt", monitor: str = "val/avg_acc"
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=Path(filename).stem,
            monitor=monitor,
            mode="max",
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # one fixed name, overwritten in place
            save_on_train_epoch_end=False,  # selection needs the validation metrics
        )
        self.best_tiebreak = -math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        # The class name, as before this became a ModelCheckpoint: older checkpoints resume.
        return type(self).__qualname__

    @property
    def best_score(self) -> float:
        """The best `val/avg_acc` so far (-inf before the first save)."""
        return -math.inf if self.best_model_score is None else float(self.best_model_score)

    def is_better(self, score: float, tiebreak: float) -> bool:
        """Lexicographic (avg_acc, mean F1) comparison; NaN never wins."""
        if math.isnan(score):
            return False
        tiebreak = -math.inf if math.isnan(tiebreak) else tiebreak
        if score != self.best_score:
            return score > self.best_score
        return tiebreak > self.best_tiebreak

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        if current is None:
            return False
        metrics = self._val_metrics(trainer)
        better = self.is_better(float(current), mean_f1(metrics, "val"))
        # Every DDP rank must agree, as in Lightning's own decision.
        return bool(trainer.strategy.reduce_boolean_decision(better, all=True))

    def _update_best_and_save(
        self, current: Tensor, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]
    ) -> None:
        # Set before Lightning saves, so best.ckpt carries its own epoch and metrics.
        metrics = self._val_metrics(trainer)
        self.best_tiebreak = mean_f1(metrics, "val")
        self.best_epoch = trainer.current_epoch
        self.best_metrics = metrics
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_atomically(trainer, Path(filepath))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    @staticmethod
    def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_score": self.best_score,
            "best_tiebreak": self.best_tiebreak,
            "best_epoch": self.best_epoch,
            "best_metrics": dict(self.best_metrics),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "best_k_models" in state_dict:
            super().load_state_dict(state_dict)
        if self.best_model_score is None and state_dict.get("best_epoch", -1) >= 0:
            # A checkpoint from before this was a ModelCheckpoint: rebuild Lightning's record.
            path = str(Path(self.dirpath or ".") / f"{self.filename}{self.FILE_EXTENSION}")
            self.best_model_score = torch.tensor(float(state_dict["best_score"]))
            self.best_model_path = self.kth_best_model_path = path
            self.best_k_models = {path: self.best_model_score}
            self.kth_value = self.best_model_score
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
