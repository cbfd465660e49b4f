"""Probabilities of a labelled split through the module's own `predict_step` (`trainer.predict`),
with optional flip TTA; used by eval and by the operating-point choice after training."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor
from torch.utils.data import DataLoader

from visioncare import TASKS
from visioncare.serving.devices import trainer_device


def collect_probabilities(
    model: L.LightningModule,
    loader: DataLoader,
    device: str | torch.device,
    tta: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Softmax probabilities per task (N, C), labels per task (N,) and source ids (N,).

    The probabilities are the model's own `predict_step` run by `trainer.predict`, so eval scores
    exactly what the LightningModule computes. With ``tta`` they are the mean over identity,
    horizontal and vertical flips (fundus photographs have no canonical orientation, so every
    flip is a valid view). ``model`` is left on the device it was on.
    """
    batches = _LabelledViews(loader, tta)
    accelerator, devices = trainer_device(device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        callbacks=[RichProgressBar()] if progress else None,
        enable_model_summary=False,
        precision="32-true",
    )
    where = next(model.parameters()).device
    outputs = trainer.predict(model, dataloaders=batches)
    model.to(where)  # Lightning's teardown moves the module to the CPU
    views = len(batches.views)
    probs = {}
    for task in TASKS:
        per_batch = []
        for start in range(0, len(outputs), views):
            summed = outputs[start][task]
            for output in outputs[start + 1 : start + views]:
                summed = summed + output[task]
            per_batch.append(summed / views)
        probs[task] = torch.cat(per_batch)
    return (
        probs,
        {t: torch.cat(v) for t, v in batches.targets.items()},
        torch.cat(batches.sources),
    )


class _LabelledViews:
    """The loader's batches, each followed by its flipped views with ``tta``; keeps the labels.

    Every view of a batch is its own `predict_step` batch, so memory stays at one batch and the
    views reach the network exactly as the loader sized them. Labels and sources are kept here
    on the host, once per batch, as the batches pass.
    """

    def __init__(self, loader: DataLoader, tta: bool) -> None:
        self.loader = loader
        self.views: list[tuple[int, ...]] = [(), (3,), (2,)] if tta else [()]
        self.targets: dict[str, list[Tensor]] = {t: [] for t in TASKS}
        self.sources: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.loader) * len(self.views)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            for task in TASKS:
                self.targets[task].append(batch[task])
            self.sources.append(torch.as_tensor(batch["source"]))
            for dims in self.views:
                yield {**batch, "image": batch["image"].flip(dims)} if dims else batch
