"""The training task behind `src/train.py`: seed, build, fit, select, test, report.

Order (as in lightning-hydra-template): seed → model, datamodule, callbacks, loggers, trainer,
all from the composed config → fit → the best epoch's weights (`best.ckpt`) validated again →
test once → `report_run` (summary.json, plots, operating points, Grad-CAM, TensorBoard hparams,
a printed table). Returns the metrics so sweeps can optimise one.

With `hparams_search=optuna` (an `optuna` node in the config) the same training function runs
once per trial of an Optuna study instead (`visioncare.runs.optuna_search`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from visioncare.config import instantiate_group
from visioncare.runs.finish import report_run
from visioncare.runs.optuna_search import run_search
from visioncare.runs.resume import checkpoint_to_resume
from visioncare.runs.trainer import (
    build_trainer,
    refuse_multirun_ddp,
    select_best,
    training_callbacks,
    warn_if_random_weights,
)
from visioncare.scoring.calibration import check_method as check_calibration
from visioncare.scoring.evaluation import IntervalSettings
from visioncare.scoring.referral import check_target_sensitivity
from visioncare.utils.accelerator import resolve_trainer_flags

log = logging.getLogger("visioncare")


def run(cfg: DictConfig) -> dict[str, float]:
    """One training run, or an Optuna search of them (`hparams_search=optuna`)."""
    if cfg.get("optuna"):
        return run_search(cfg, fit)
    return fit(cfg)


def fit(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Train, select on validation, test once; returns best validation and test metrics.

    ``extra_callbacks`` join the config's (an Optuna trial's pruning callback).
    """
    refuse_multirun_ddp(cfg)
    # auto/null become Lightning's values here, so the stored config records what runs.
    resolve_trainer_flags(cfg)
    target_sensitivity = check_target_sensitivity(cfg.get("target_sensitivity"))
    check_calibration(cfg.get("calibration", "temperature"))
    IntervalSettings.from_config(cfg, default_seed=int(cfg.seed))  # the test report's, checked now
    L.seed_everything(cfg.seed, workers=True)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    ckpt_path = checkpoint_to_resume(cfg)

    log.info("Building model <%s>", cfg.model.backbone)
    model = instantiate(cfg.model, loss=instantiate(cfg.loss))
    datamodule = instantiate(cfg.data)
    warn_if_random_weights(cfg.model, datamodule)
    # Lightning calls prepare_data again inside fit (a no-op then); this early call checks and
    # caches the data before any process group exists: a first-time cache of a large dataset
    # must not keep the other DDP ranks at Lightning's barrier past its timeout, and bad input
    # fails before a logger or checkpoint directory is made. The file lock serialises ranks.
    datamodule.prepare_data()

    loggers = instantiate_group(cfg.get("logger"))
    callbacks = [*training_callbacks(cfg, ckpt_path, loggers), *extra_callbacks]
    trainer = build_trainer(cfg.trainer, callbacks, loggers)

    if cfg.get("train", True):
        # weights_only=True: checkpoints hold plain data only, so loading never runs pickled code.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    best_cb = select_best(trainer, model)
    test_metrics: dict[str, float] = {}
    if (best_cb is not None and best_cb.best_model_path) or cfg.get("test", True):
        # Re-validate the best weights (their confusion matrices; they are now in `model`).
        trainer.validate(model, datamodule, verbose=False)
    if cfg.get("test", True):
        results = trainer.test(model, datamodule)  # exactly once
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    return report_run(cfg, trainer, model, datamodule, best_cb, test_metrics, target_sensitivity)
