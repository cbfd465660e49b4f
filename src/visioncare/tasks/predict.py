"""Batch prediction: images (folder, glob or CSV) → one CSV row per image, optional Grad-CAM.

The model and its preprocessing are rebuilt from the checkpoint alone
(`visioncare.serving.loading`), so predictions use exactly the crop, resize and normalisation
the network was validated with.
A file that cannot be decoded never stops the run: it gets a row with `error` set and empty
predictions, because one corrupt photo in a clinic's export folder must not lose the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from visioncare.data.image_files import collect_images
from visioncare.data.quality import QualityThresholds
from visioncare.errors import check_int_at_least
from visioncare.scoring.referral import threshold_for
from visioncare.serving.devices import resolve_device
from visioncare.serving.explain import write_gradcam
from visioncare.serving.loading import (
    OnnxNet,
)
from visioncare.serving.predictor import (
    load_predictor,
    predict_paths,
    write_predictions,
)

log = logging.getLogger("visioncare")


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- device


# --------------------------------------------------------------------------- prediction


# --------------------------------------------------------------------------- task


def _resolve_output(path: str, output_dir: Path) -> Path:
    target = Path(path).expanduser()
    return target if target.is_absolute() else output_dir / target


def run(cfg: DictConfig) -> dict[str, Any]:
    """`src/predict.py`'s task: checkpoint + input → CSV (+ Grad-CAM overlays with explain=true)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_int_at_least(cfg.batch_size, "batch_size")
    check_int_at_least(cfg.num_workers, "num_workers", minimum=0)
    device = resolve_device(str(cfg.get("device", "auto")))
    model, spec = load_predictor(str(cfg.ckpt_path), device, explain=bool(cfg.get("explain")))
    thresholds = QualityThresholds.from_config(cfg.get("quality"))
    paths = collect_images(cfg.input)
    if isinstance(model, OnnxNet):
        device = torch.device("cpu")  # onnxruntime takes host arrays; it places the work itself
        engine = f"onnxruntime ({model.provider})"
    else:
        engine = f"PyTorch on {device}"
    log.info("Predicting %d image(s) with %s", len(paths), engine)
    probs, errors, qualities, gradable = predict_paths(
        model, spec, paths, int(cfg.batch_size), int(cfg.num_workers), device, thresholds
    )
    output = _resolve_output(str(cfg.output), output_dir)
    points = getattr(model, "operating_points", None)
    threshold = threshold_for(points, "dr")
    if points:
        log.info("referable_dr: P(DR >= 2) >= %.4f (chosen on validation)", threshold)
    else:
        log.warning(
            "%s stores no operating point chosen on validation: referable_dr uses P(DR >= 2) >= %s",
            cfg.ckpt_path,
            threshold,
        )
    write_predictions(output, paths, probs, errors, qualities, gradable, threshold)
    doubtful = sum(q not in ("", "ok") for q in qualities)
    if doubtful:
        log.warning(
            "%d of %d photo(s) look doubtful (see the 'quality' column): predicted anyway",
            doubtful,
            len(paths),
        )
    failed = sum(bool(e) for e in errors)
    if failed:
        log.warning(
            "%d of %d image(s) could not be read (see the 'error' column)", failed, len(paths)
        )
    log.info("Predictions: %s", output)
    result: dict[str, Any] = {"output": str(output), "num_images": len(paths), "num_errors": failed}
    if cfg.get("explain"):
        explain_dir = _resolve_output(str(cfg.explain_dir), output_dir)
        overlays = write_gradcam(
            model,
            spec,
            paths,
            probs,
            errors,
            explain_dir,
            device,
            batch_size=int(cfg.get("explain_batch_size", 8)),
            size=int(cfg.get("explain_size", 512)),
        )
        log.info("Grad-CAM overlays (%d): %s", len(overlays), explain_dir)
        result["explain_dir"] = str(explain_dir)
    return result
