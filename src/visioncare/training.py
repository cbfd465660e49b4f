"""The training task behind `src/train.py`: seed, build, fit, test on best.ckpt, report.

Order (as in lightning-hydra-template): seed → model, datamodule, callbacks, loggers, trainer,
all from the composed config → fit (Lightning runs the datamodule's `prepare_data`, which checks
and caches the data before any training step) → test once with `best.ckpt` → summary.json, plots,
TensorBoard hparams, a printed table. Returns the metrics so sweeps can optimise one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from visioncare.callbacks import BestAverageAccuracy, RunConfigRecord
from visioncare.cli import instantiate_group
from visioncare.errors import ConfigurationError
from visioncare.evaluation import collect_probabilities
from visioncare.explain import gradcam_examples
from visioncare.inference import load_model
from visioncare.models.net import normalise_pretrained
from visioncare.models.sync_batchnorm import TimmSyncBatchNorm
from visioncare.referral import (
    DEFAULT_TARGET_SENSITIVITY,
    operating_points,
    store_operating_points,
)
from visioncare.utils.accelerator import enable_tf32, resolve_trainer_flags, trainer_flags
from visioncare.utils.checkpoints import carry_best_checkpoint, resolve_ckpt_path
from visioncare.utils.launcher import checkpoint_to_resume
from visioncare.utils.run_summary import print_summary_table, write_plots, write_summary

log = logging.getLogger("visioncare")

RANDOM_WEIGHTS_WARNING = """
###########################################################################################
#  Training on real fundus data from RANDOM weights (model.pretrained=false, no          #
#  model.weights_path). Expect results far below pretrained ones (IDRiD joint accuracy    #
#  ~0.6 needs ImageNet weights). Use model.pretrained=true with network access, or        #
#  model.weights_path=FILE with a local timm checkpoint.                                  #
###########################################################################################"""


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs people compare runs by, for TensorBoard's HPARAMS tab."""
    picks = {
        "model.backbone": "model.backbone",
        "model.pretrained": "model.pretrained",
        "lr": "model.optimizer.lr",
        "weight_decay": "model.optimizer.weight_decay",
        "unfreeze_step": "unfreeze_step",
        "seed": "seed",
        "data.image_size": "data.image_size",
        "data.batch_size": "data.batch_size",
        "loss": "loss._target_",
        "trainer.precision": "trainer.precision",
        "trainer.max_epochs": "trainer.max_epochs",
    }
    values = {}
    for name, key in picks.items():
        value = OmegaConf.select(cfg, key)
        values[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def log_gradcam_to_tensorboard(
    model: Any, datamodule: Any, loggers: list, output_dir: Path, count: int
) -> None:
    """Grad-CAM overlays of the first validation images, to `plots/gradcam/` and TensorBoard."""
    records = datamodule.splits.get("val", [])[:count]
    if not records:
        return
    spec = datamodule.input_spec()
    paths = [r.image for r in records]
    written = gradcam_examples(model, spec, paths, output_dir / "plots" / "gradcam")
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for path in written:
                image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
                logger.experiment.add_image(f"gradcam/{path.stem}", image, dataformats="HWC")


def check_target_sensitivity(value: Any) -> float:
    """`target_sensitivity` as a float in (0, 1], checked before training (not after it)."""
    if value is None:
        return DEFAULT_TARGET_SENSITIVITY
    try:
        target = float(value)
    except (TypeError, ValueError):
        target = float("nan")
    if not 0.0 < target <= 1.0:
        raise ConfigurationError(
            f"target_sensitivity={value!r} is not allowed; give the sensitivity the referable "
            "operating point must reach on validation as a fraction in (0, 1], e.g. 0.85"
        )
    return target


def choose_operating_points(
    model: Any, datamodule: Any, ckpt_path: str, target_sensitivity: float
) -> None:
    """Pick the referable thresholds on the whole validation split; store them in ``ckpt_path``.

    ``model`` holds the best weights. The whole split is read here (not this rank's share), so
    the threshold is the same whatever the number of processes.
    """
    dataset = datamodule.datasets.get("val")
    if dataset is None or len(dataset) == 0:
        log.warning("No validation images: referable decisions will use P(referable) >= 0.5")
        return
    loader = DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=False, num_workers=0)
    # trainer.predict puts the model in eval mode and restores its modes afterwards.
    probs, targets, _ = collect_probabilities(model, loader, model.device)
    points = operating_points(probs, targets, target_sensitivity)
    model.operating_points = points
    store_operating_points(ckpt_path, points)
    for task, point in points.items():
        log.info(
            "Referable %s operating point: P(referable) >= %.4f (validation sensitivity %.3f, "
            "specificity %s, target %.2f)",
            task.upper(),
            point["threshold"],
            point["val_sensitivity"],
            "n/a" if point["val_specificity"] is None else f"{point['val_specificity']:.3f}",
            target_sensitivity,
        )


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
    """
    enable_tf32(trainer_cfg.precision, trainer_cfg.accelerator)
    plugins = list(instantiate(trainer_cfg.get("plugins")) or [])
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, select on validation, test once; returns best validation and test metrics."""
    refuse_multirun_ddp(cfg)
    # auto/null become Lightning's values here, so the stored config records what runs.
    resolve_trainer_flags(cfg)
    target_sensitivity = check_target_sensitivity(cfg.get("target_sensitivity"))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir, cfg.task_name))
    if (resume := checkpoint_to_resume(output_dir, ckpt_path)) != ckpt_path:
        log.info("SLURM job requeued: resuming from its own %s", resume)
        ckpt_path = resume

    log.info("Building model <%s>", cfg.model.backbone)
    model = instantiate(cfg.model, loss=instantiate(cfg.loss))
    datamodule = instantiate(cfg.data)
    random_weights = normalise_pretrained(cfg.model.pretrained) == "none"
    if random_weights and not cfg.model.weights_path and not datamodule.is_synthetic:
        log.warning(RANDOM_WEIGHTS_WARNING)
    # Lightning calls prepare_data again inside fit (a no-op then); this early call checks and
    # caches the data before any process group exists: a first-time cache of a large dataset
    # must not keep the other DDP ranks at Lightning's barrier past its timeout, and bad input
    # fails before a logger or checkpoint directory is made. The file lock serialises ranks.
    datamodule.prepare_data()

    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks.append(RunConfigRecord(OmegaConf.to_container(cfg, resolve=True)))
    best_cb = next((c for c in callbacks if isinstance(c, BestAverageAccuracy)), None)
    if ckpt_path and best_cb is not None:
        best_file = best_cb.dirpath / best_cb.filename
        carry_best_checkpoint(ckpt_path, best_file, copy=rank_zero_only.rank == 0)
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger; metrics.csv has `lr`
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = build_trainer(cfg.trainer, callbacks, loggers)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(_hparams(cfg))

    if cfg.get("train", True):
        # weights_only=True: checkpoints hold plain data only, so loading never runs pickled code.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    best_path = best_cb.best_model_path if best_cb else ""
    if not best_path:
        log.warning("No best checkpoint was selected; evaluating the current weights")
    test_metrics: dict[str, float] = {}
    if best_path:
        load_best_weights(trainer, model, best_path)
    if best_path or cfg.get("test", True):
        # Re-validate the best weights (their confusion matrices; they are now in `model`).
        trainer.validate(model, datamodule, verbose=False)
    if cfg.get("test", True):
        # Test exactly once.
        results = trainer.test(model, datamodule)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

    best_metrics = dict(best_cb.best_metrics) if best_cb else {}
    best_epoch = best_cb.best_epoch if best_cb else -1
    if trainer.is_global_zero:
        model_info = {"backbone": cfg.model.backbone, "weights": model.net.weights_provenance}
        summary = write_summary(
            output_dir / "summary.json",
            best_epoch,
            best_metrics,
            test_metrics,
            datamodule.sizes(),
            model_info,
            trainer_flags(cfg),
        )
        write_plots(output_dir, model.confusion, output_dir / "metrics.csv")
        # A fresh model from best.ckpt, never the compiled training one, on the training device
        # (Lightning moves the trained model back to the CPU when it is done). After `test`, so
        # no other rank waits at a barrier while rank 0 works alone.
        device = str(trainer.strategy.root_device)
        best_model = load_model(best_path, device)[0] if best_path else None
        if best_model is not None:
            choose_operating_points(best_model, datamodule, best_path, target_sensitivity)
        if count := cfg.get("gradcam_images", 4):
            explained = best_model if best_model is not None else model
            log_gradcam_to_tensorboard(explained, datamodule, loggers, output_dir, count)
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                hp_metrics = {
                    f"hp/best_{k.replace('/', '_')}": v
                    for k, v in best_metrics.items()
                    if k in ("val/avg_acc", "val/joint_acc")
                }
                hp_metrics.update(
                    {
                        f"hp/{k.replace('/', '_')}": v
                        for k, v in test_metrics.items()
                        if k in ("test/avg_acc", "test/joint_acc")
                    }
                )
                logger.log_hyperparams(_hparams(cfg), metrics=hp_metrics)
        # Lightning closed the loggers after `test`; what was written since sits in a new event
        # file's queue, drained by a daemon thread that dies with the process: flush and close.
        for logger in loggers:
            logger.finalize("success")
        print_summary_table(summary)
        log.info("Run directory: %s", output_dir)
    return {**best_metrics, **test_metrics}
