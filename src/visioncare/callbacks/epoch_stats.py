"""Per-epoch resource statistics and the one-row-per-epoch `metrics.csv`.

`EpochStats` logs `time/epoch_s` (wall time of the epoch's training part, validation excluded),
`memory/rss_mb` (peak resident memory of the process) and, on GPU, `memory/gpu_peak_mb` (peak of
tensors allocated) and `memory/gpu_reserved_mb` (peak held by PyTorch's caching allocator).
`EpochMetricsCSV` writes every epoch-level scalar Lightning has collected as one row of
`metrics.csv`, plus `lr` (the heads' group, the run's reference rate) as the epoch trained with it.

Every epoch value — these statistics, the module's training losses and metrics — is logged
after the epoch's last training batch, so Lightning has reduced all of it before any
`on_train_epoch_end` hook runs: the row is complete whatever the order of the callbacks.
"""

from __future__ import annotations

import csv
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from visioncare.utils.loops import epoch_ends_after

# The contract's columns first, in this order; anything else logged follows alphabetically.
LEADING_COLUMNS = (
    "epoch",
    "train/loss",
    "train/loss_dr",
    "train/loss_dme",
    "val/loss",
    "val/loss_dr",
    "val/loss_dme",
    "train/acc_dr",
    "train/acc_dme",
    "val/acc_dr",
    "val/acc_dme",
    "val/f1_dr",
    "val/f1_dme",
    "val/avg_acc",
    "lr",
    "time/epoch_s",
    "memory/rss_mb",
    "memory/gpu_peak_mb",
    "loss/sigma_dr",
    "loss/sigma_dme",
    "unfreeze/stage",
    "unfreeze/trainable_fraction",
)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class EpochStats(Callback):
    """Log the training part's wall time and the peak memory of every epoch.

    Logged after the epoch's last training batch, before validation starts, so the time is the
    training part alone.
    """

    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if epoch_ends_after(trainer, batch_idx):
            self._log_once(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_once(pl_module)  # a no-op unless the epoch ended before its last batch

    def _log_once(self, pl_module: L.LightningModule) -> None:
        """Log this epoch's time and memory, the first time it is asked only."""
        if self._start is None:
            return
        seconds, self._start = time.perf_counter() - self._start, None
        pl_module.log("time/epoch_s", seconds, on_step=False, on_epoch=True)
        pl_module.log("memory/rss_mb", peak_rss_mb(), on_step=False, on_epoch=True)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            pl_module.log("memory/gpu_peak_mb", peak, on_step=False, on_epoch=True)
            # What the caching allocator held (closer to nvidia-smi, less the CUDA context).
            reserved = torch.cuda.max_memory_reserved(pl_module.device) / 2**20
            pl_module.log("memory/gpu_reserved_mb", reserved, on_step=False, on_epoch=True)


class EpochMetricsCSV(Callback):
    """Append one row per epoch to ``path``, merging train and validation scalars.

    The file is rewritten atomically each epoch (a new column may appear late, e.g. on GPU), and
    rows of epochs at or after the resumed epoch are dropped when a run resumes into the same file.

    Args:
        path: the CSV file (`<run>/metrics.csv`).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] | None = None
        self._lr: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning restored a checkpoint (current_epoch is the resumed one) and also
        # when a resume starts mid-epoch (no on_train_epoch_start then): keep earlier rows.
        self.rows = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                self.rows = [
                    r for r in csv.DictReader(handle) if int(r["epoch"]) < trainer.current_epoch
                ]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The LR this epoch trains with, read at its first batch (after every epoch-start hook;
        # Lightning steps an epoch-interval scheduler after the epoch's last batch, before the
        # epoch-end hooks). `LearningRateMonitor` logs every group to the loggers; the CSV
        # keeps the first (heads') group, the run's reference rate.
        if self._lr is None and trainer.optimizers:
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        if self._lr is not None:
            row["lr"] = self._lr
        self._lr = None
        for name, value in trainer.callback_metrics.items():
            if name.startswith("test/") or not hasattr(value, "numel") or value.numel() != 1:
                continue
            number = float(value)
            row[name] = "" if math.isnan(number) else number
        if self.rows is None:
            self.rows = []
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write()

    def _write(self) -> None:
        names = {name for row in self.rows for name in row}
        columns = [c for c in LEADING_COLUMNS if c in names]
        columns += sorted(names - set(columns))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
