"""`RunConfigRecord`: the composed run config travels inside every checkpoint the run writes."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from visioncare.runs.resume import RUN_CONFIG_KEY


class RunConfigRecord(Callback):
    """Store the composed run config (a plain dict) in every checkpoint this run writes.

    eval.py rebuilds the loss and, by default, the dataset from it; it is also the record of
    what ran. The module's constructor arguments are Lightning's `hyper_parameters`; the input
    spec is the module's own record (`visioncare.data.input_spec`).

    Args:
        config: the run's composed config, resolved to plain values.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config
