"""Building a training run's Trainer and the pieces around it: callbacks, loggers, best weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from visioncare.callbacks.checkpoint import BestAverageAccuracy
from visioncare.callbacks.run_config import RunConfigRecord
from visioncare.config import instantiate_group
from visioncare.errors import ConfigurationError
from visioncare.models.net import normalise_pretrained
from visioncare.models.sync_batchnorm import TimmSyncBatchNorm
from visioncare.runs.launcher import submitit_slurm_environment
from visioncare.runs.resume import carry_best_checkpoint
from visioncare.utils.accelerator import enable_tf32

log = logging.getLogger("visioncare")

RANDOM_WEIGHTS_WARNING = """
###########################################################################################
#  Training on real fundus data from RANDOM weights (model.pretrained=false, no          #
#  model.weights_path). Expect results far below pretrained ones (IDRiD joint accuracy    #
#  ~0.6 needs ImageNet weights). Use model.pretrained=true with network access, or        #
#  model.weights_path=FILE with a local timm checkpoint.                                  #
###########################################################################################"""


def refuse_multirun_ddp(cfg: DictConfig) -> None:
    """A Hydra multirun whose jobs each launch DDP processes is refused up front.

    Lightning's DDP launcher re-runs the script for every extra rank with the job's overrides,
    which under a sweep starts the other ranks outside the sweep's job and directory.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if "ddp" in str(cfg.trainer.get("strategy") or ""):
        raise ConfigurationError(
            f"trainer.strategy={cfg.trainer.strategy} cannot run inside a Hydra multirun (-m): "
            "run each configuration as its own `python src/train.py trainer=ddp ...` command, "
            "or sweep on a single device"
        )


def build_trainer(trainer_cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of `trainer_cfg`, already resolved by `resolve_trainer_flags`; timm's SyncBN.

    `trainer.sync_batchnorm=true` converts with timm's `convert_sync_batchnorm` (through the
    `TimmSyncBatchNorm` plugin) instead of torch's, which drops timm's fused activations.
    Under submitit's SLURM jobs only submitit requeues (`submitit_slurm_environment`).
    """
    enable_tf32(trainer_cfg.precision, trainer_cfg.accelerator)
    plugins = list(instantiate(trainer_cfg.get("plugins")) or [])
    submitit_env = submitit_slurm_environment()
    if submitit_env and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(submitit_env)
    if trainer_cfg.get("sync_batchnorm"):
        plugins.append(TimmSyncBatchNorm())
    return instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=loggers or False,
        sync_batchnorm=False,
        plugins=plugins or None,
    )


def load_best_weights(trainer: L.Trainer, model: L.LightningModule, best_path: str) -> None:
    """Load `best.ckpt`'s weights on every rank from the copy rank 0 wrote.

    Rank 0 reads the file and broadcasts the weights, so ranks on other nodes need not see the
    file (node-local log directories work) and all ranks evaluate the same weights.
    """
    state = None
    if trainer.is_global_zero:
        # weights_only=True: checkpoints hold plain data only, so loading never runs pickled code.
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(trainer.strategy.broadcast(state, src=0))


def warn_if_random_weights(model_cfg: DictConfig, datamodule: Any) -> None:
    """A loud warning when real fundus data is trained from random weights."""
    random_weights = normalise_pretrained(model_cfg.pretrained) == "none"
    if random_weights and not model_cfg.weights_path and not datamodule.is_synthetic:
        log.warning(RANDOM_WEIGHTS_WARNING)


def training_callbacks(
    cfg: DictConfig, ckpt_path: str | None, loggers: list[Any]
) -> list[Callback]:
    """The config's callbacks plus the run-config record; a resumed run's best.ckpt carried over.

    Without a logger `LearningRateMonitor` refuses to run; metrics.csv has `lr` anyway.
    """
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks.append(RunConfigRecord(OmegaConf.to_container(cfg, resolve=True)))
    best_cb = best_checkpoint_callback(callbacks)
    if ckpt_path and best_cb is not None:
        best_file = Path(best_cb.dirpath) / f"{best_cb.filename}{best_cb.FILE_EXTENSION}"
        carry_best_checkpoint(ckpt_path, best_file, copy=rank_zero_only.rank == 0)
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def best_checkpoint_callback(callbacks: list[Callback]) -> BestAverageAccuracy | None:
    """The run's `BestAverageAccuracy`, if the config has one."""
    return next((c for c in callbacks if isinstance(c, BestAverageAccuracy)), None)


def select_best(trainer: L.Trainer, model: L.LightningModule) -> BestAverageAccuracy | None:
    """Put the selected epoch's weights into ``model`` (every rank); the checkpoint callback."""
    best_cb = best_checkpoint_callback(trainer.callbacks)
    if best_cb is not None and best_cb.best_model_path:
        load_best_weights(trainer, model, best_cb.best_model_path)
    else:
        log.warning("No best checkpoint was selected; evaluating the current weights")
    return best_cb
