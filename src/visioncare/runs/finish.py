"""The end of a training run, after `test`: one call, `report_run`, writes what a run leaves.

In order, on rank 0 only (no other rank waits at a barrier while it works): the per-task
temperatures and then the referable operating points on the calibrated probabilities, both
fitted on validation with the best weights (stored in `best.ckpt`), the test report of those
calibrated weights at that operating point (eval's metrics with bootstrap intervals and
subgroups, `visioncare.scoring.evaluation`), `summary.json` (with the `calibration` and
`test_report` records), `model_card.md`, the plots, Grad-CAM overlays, TensorBoard's hparams
with the final metrics, the loggers flushed and closed, and the printed table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from visioncare import TASKS
from visioncare.runs.model_card import FILENAME as CARD_FILENAME
from visioncare.runs.model_card import write_model_card
from visioncare.runs.reproducibility import reproducibility_record
from visioncare.runs.splits import FILENAME, write_splits
from visioncare.runs.summary import print_summary_table, write_plots, write_summary
from visioncare.scoring.calibration import (
    calibrate,
    check_method,
    checkpoint_entry,
    fit_calibration,
    store_calibration,
    temperatures_from,
)
from visioncare.scoring.evaluation import IntervalSettings, score_split
from visioncare.scoring.referral import (
    operating_points,
    store_operating_points,
    threshold_for,
)
from visioncare.scoring.report import reliability_diagrams
from visioncare.serving.explain import gradcam_examples
from visioncare.serving.loading import load_model
from visioncare.serving.probabilities import collect_probabilities
from visioncare.utils.accelerator import trainer_flags
from visioncare.utils.formatting import fmt_number
from visioncare.utils.tensorboard import log_png_images

log = logging.getLogger("visioncare")

# The selection and test numbers that TensorBoard's HPARAMS tab compares runs by.
HP_METRICS = ("val/avg_acc", "val/joint_acc", "test/avg_acc", "test/joint_acc")


def hparams(cfg: DictConfig) -> dict[str, Any]:
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
            log_png_images(logger.experiment, written, "gradcam")


def _split_probabilities(model: Any, datamodule: Any, split: str) -> tuple | None:
    """Raw probabilities, targets and source ids of the *whole* ``split`` (not this rank's
    share), in record order; None when the split has no images.

    `collect_probabilities` runs `trainer.predict`, which puts the model in eval mode and
    restores its modes afterwards.
    """
    dataset = datamodule.datasets.get(split)
    if dataset is None or len(dataset) == 0:
        return None
    loader = DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=False, num_workers=0)
    return collect_probabilities(model, loader, model.device)


def choose_operating_points(
    model: Any,
    datamodule: Any,
    ckpt_path: str,
    target_sensitivity: float,
    calibration: str = "temperature",
    plots_dir: Path | None = None,
) -> tuple[dict[str, Any] | None, list[Path]]:
    """Calibrate, then pick the referable thresholds, on the whole validation split.

    ``model`` holds the best weights. The temperatures are fitted first (NLL, one per task) and
    the thresholds chosen on the calibrated probabilities, because those are what eval and
    predict compare with the threshold. Both are stored in ``ckpt_path``. The whole split is
    read here (not this rank's share), so the result is the same whatever the number of
    processes. With ``plots_dir``, draws the validation reliability diagrams (calibrated beside
    raw) there. Returns the calibration record for summary.json (None: no validation images)
    and the diagrams written.
    """
    collected = _split_probabilities(model, datamodule, "val")
    if collected is None:
        log.warning(
            "No validation images: no calibration, and referable decisions will use "
            "P(referable) >= 0.5"
        )
        return None, []
    probs, targets, _ = collected
    record = fit_calibration(probs, targets, calibration)
    entry = checkpoint_entry(record)
    model.temperatures = temperatures_from(entry)
    store_calibration(ckpt_path, entry)
    for task in probs:
        temperature = None if model.temperatures is None else model.temperatures[task]
        log.info(
            "Calibration (%s) %s: temperature %s, validation NLL %s -> %s",
            calibration,
            task.upper(),
            fmt_number(temperature, missing="n/a"),
            fmt_number(record["val_nll_before"][task], missing="n/a"),
            fmt_number(record["val_nll_after"][task], missing="n/a"),
        )
    calibrated = calibrate(probs, model.temperatures)
    points = operating_points(calibrated, targets, target_sensitivity)
    model.operating_points = points
    store_operating_points(ckpt_path, points)
    for task, point in points.items():
        log.info(
            "Referable %s operating point: P(referable) >= %.4f (validation sensitivity %.3f, "
            "specificity %s, target %.2f)",
            task.upper(),
            point["threshold"],
            point["val_sensitivity"],
            fmt_number(point["val_specificity"], 3, missing="n/a"),
            target_sensitivity,
        )
    diagrams = []
    if plots_dir is not None:
        diagrams = reliability_diagrams(plots_dir, calibrated, probs, targets, "val")
    return record, diagrams


def report_test_split(
    model: Any, datamodule: Any, settings: IntervalSettings
) -> dict[str, Any] | None:
    """summary.json's `test_report`: the test split scored like eval.py scores it.

    ``model`` holds the best weights with the temperatures and operating points just chosen on
    validation. Its calibrated probabilities go through `score_split`, eval's own composition,
    so every key (``test/acc_dr``, ``..._ci_low``, ``test/group/source=x/num``) means what it
    means in eval's metrics.json for this checkpoint. The photos are not read again for their
    quality verdict (`not_assessed`: eval.py reports the gradable subset). None without test
    images.
    """
    collected = _split_probabilities(model, datamodule, "test")
    if collected is None:
        return None
    raw_probs, targets, source_ids = collected
    probs = calibrate(raw_probs, model.temperatures)
    thresholds = {t: threshold_for(model.operating_points, t) for t in TASKS}
    records = datamodule.splits["test"]
    metrics, _ = score_split(
        probs,
        raw_probs,
        targets,
        source_ids,
        datamodule.source_names,
        records,
        "test",
        thresholds,
        settings,
    )
    return {
        "split": "test",
        "images": len(records),
        "unit": "patients" if "test/patient/num_patients" in metrics else "images",
        "bootstrap": {
            "resamples": settings.resamples,
            "level": settings.level,
            "seed": settings.seed,
        },
        "subgroups_min_size": settings.min_size,
        "not_assessed": ["gradable"],
        # Scalars only (undefined values are None already): the confusion matrices stay in
        # eval's metrics.json.
        "metrics": {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))},
    }


def hparams_metrics(best_metrics: dict[str, float], test_metrics: dict[str, float]) -> dict:
    """`hp/best_val_avg_acc`, `hp/test_avg_acc`, ...: what the HPARAMS tab shows per run."""
    values = {f"best_{k}": v for k, v in best_metrics.items()}
    values.update(test_metrics)
    return {
        f"hp/{k.replace('/', '_')}": v
        for k, v in values.items()
        if k.removeprefix("best_") in HP_METRICS
    }


def report_run(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: Any,
    datamodule: Any,
    best_cb: Any,
    test_metrics: dict[str, float],
    target_sensitivity: float,
) -> dict[str, float]:
    """Write everything a finished run leaves (module docstring); returns best + test metrics.

    ``best_cb`` is the run's `BestAverageAccuracy` (None without one); ``model`` holds the best
    weights and has been validated with them (its confusion matrices are the best epoch's).
    """
    best_metrics = dict(best_cb.best_metrics) if best_cb else {}
    if not trainer.is_global_zero:
        return {**best_metrics, **test_metrics}
    output_dir = Path(cfg.paths.output_dir)
    best_path = best_cb.best_model_path if best_cb else ""
    # A fresh model from best.ckpt, never the compiled training one, on the training device
    # (Lightning moves the trained model back to the CPU when it is done).
    best_model = None
    calibration = None
    diagrams: list[Path] = []
    card_config: dict = {}
    tested = None
    if best_path:
        best_model, card_config = load_model(best_path, str(trainer.strategy.root_device))
        method = check_method(cfg.get("calibration", "temperature"))
        calibration, diagrams = choose_operating_points(
            best_model, datamodule, best_path, target_sensitivity, method, output_dir / "plots"
        )
        if cfg.get("test", True):  # test=false: the test split stays untouched
            settings = IntervalSettings.from_config(cfg, default_seed=int(cfg.seed))
            tested = report_test_split(best_model, datamodule, settings)
    summary = write_summary(
        output_dir / "summary.json",
        best_cb.best_epoch if best_cb else -1,
        best_metrics,
        test_metrics,
        datamodule.sizes(),
        {"backbone": cfg.model.backbone, "weights": model.net.weights_provenance},
        trainer_flags(cfg),
        extra={
            "calibration": calibration,
            "test_report": tested,
            "splits": {"file": FILENAME, "sha256": write_splits(output_dir, datamodule.splits)},
            "reproducibility": reproducibility_record(),
        },
    )
    write_model_card(
        output_dir / CARD_FILENAME,
        summary,
        card_config or OmegaConf.to_container(cfg, resolve=False),
        output_dir,
        best_model.operating_points if best_model is not None else None,
    )
    write_plots(output_dir, model.confusion, output_dir / "metrics.csv")
    loggers = trainer.loggers
    if count := cfg.get("gradcam_images", 4):
        explained = best_model if best_model is not None else model
        log_gradcam_to_tensorboard(explained, datamodule, loggers, output_dir, count)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            log_png_images(logger.experiment, diagrams, "calibration")
            logger.log_hyperparams(
                hparams(cfg), metrics=hparams_metrics(best_metrics, test_metrics)
            )
        # Lightning closed the loggers after `test`; what was written since sits in a new event
        # file's queue, drained by a daemon thread that dies with the process: flush and close.
        logger.finalize("success")
    print_summary_table(summary)
    log.info("Run directory: %s", output_dir)
    return {**best_metrics, **test_metrics}
