"""Batch prediction: images (folder, glob or CSV) → one CSV row per image, optional Grad-CAM.

The model and its preprocessing are rebuilt from the checkpoint alone (`visioncare.inference`),
so predictions use exactly the crop, resize and normalisation the network was validated with.
A file that cannot be decoded never stops the run: it gets a row with `error` set and empty
predictions, because one corrupt photo in a clinic's export folder must not lose the others.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from visioncare import TASKS
from visioncare.data.inputs import collect_images
from visioncare.data.preprocess import UnreadableImageError
from visioncare.data.quality import QualityThresholds
from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.explain import write_gradcam
from visioncare.inference import (
    ImagePreprocessor,
    InputSpec,
    OnnxNet,
    input_spec,
    load_model,
    load_onnx,
)
from visioncare.referral import DEFAULT_THRESHOLD, referable_score, threshold_for
from visioncare.utils.progress import progress_bar

log = logging.getLogger("visioncare")


def csv_columns() -> list[str]:
    """The output CSV's columns, in order (a contract: see DESIGN.md)."""
    probs = [f"{task}_prob_{k}" for task, n in TASKS.items() for k in range(n)]
    return ["image", "dr_grade", "dme_grade", *probs, "referable_dr", "quality", "error"]


# --------------------------------------------------------------------------- inputs


class _ImageFiles(Dataset):
    """Preprocessed tensors for a list of files with their quality flag; an unreadable file
    yields zeros, an empty flag and its error."""

    def __init__(self, paths: Sequence[Path], preprocessor: ImagePreprocessor) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        size = preprocessor.spec.image_size
        self.blank = torch.zeros(3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str, str]:
        try:
            tensor, prepared = self.preprocessor.prepare(self.paths[index])
        except (UnreadableImageError, OSError) as error:
            return self.blank, index, "", str(error) or type(error).__name__
        return tensor, index, prepared.quality, ""


# --------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigurationError(f"device={device!r} is not a torch device: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device=cuda but CUDA is not available; use device=auto or cpu")
    return resolved


# --------------------------------------------------------------------------- prediction


def _rows(
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    qualities: Sequence[str],
    threshold: float,
) -> Iterator[dict[str, Any]]:
    referable = referable_score(probs["dr"], "dr")
    for i, path in enumerate(paths):
        row: dict[str, Any] = dict.fromkeys(csv_columns(), "")
        row["image"] = str(path)
        row["quality"] = qualities[i]
        row["error"] = errors[i]
        if not errors[i]:
            for task, p in probs.items():
                row[f"{task}_grade"] = int(p[i].argmax())
                for k, value in enumerate(p[i].tolist()):
                    row[f"{task}_prob_{k}"] = f"{value:.6f}"
            row["referable_dr"] = int(float(referable[i]) >= threshold)
        yield row


def predict_paths(
    model: Callable[[Tensor], dict[str, Tensor]],
    spec: InputSpec,
    paths: Sequence[Path],
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    thresholds: QualityThresholds | None = None,
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Softmax probabilities per task (rows of failed files are NaN), per-file error texts and
    quality flags (`visioncare.data.quality`; empty for failed files).

    ``model`` maps a batch of images to logits per task: a `VisionCareModule` already in eval
    mode on ``device``, or an `OnnxNet`. A doubtful photo is still predicted: its flag says so.
    """
    dataset = _ImageFiles(paths, ImagePreprocessor(spec, thresholds))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    probs = {task: torch.full((len(paths), n), float("nan")) for task, n in TASKS.items()}
    errors = [""] * len(paths)
    qualities = [""] * len(paths)
    with progress_bar() as progress, torch.inference_mode():
        bar = progress.add_task("Predicting", total=len(paths))
        for images, indices, flags, messages in loader:
            ok = torch.tensor([not m for m in messages], dtype=torch.bool)
            for index, flag, message in zip(indices.tolist(), flags, messages, strict=True):
                errors[index] = message
                qualities[index] = flag
            if ok.any():
                logits = model(images[ok].to(device))
                for task in TASKS:
                    probs[task][indices[ok]] = logits[task].float().softmax(dim=1).cpu()
            progress.advance(bar, len(indices))
    return probs, errors, qualities


def write_predictions(
    output: Path,
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    qualities: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """The prediction CSV (columns: `csv_columns()`).

    ``referable_dr`` is P(DR >= 2) >= ``threshold`` (the checkpoint's validation operating point).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns())
        writer.writeheader()
        writer.writerows(_rows(paths, probs, errors, qualities, threshold))


# --------------------------------------------------------------------------- task


def _resolve_output(path: str, output_dir: Path) -> Path:
    target = Path(path).expanduser()
    return target if target.is_absolute() else output_dir / target


def load_predictor(
    ckpt_path: str, device: torch.device, explain: bool = False
) -> tuple[Callable[[Tensor], dict[str, Tensor]], InputSpec]:
    """The model and its input spec from a checkpoint (.ckpt) or an exported `model.onnx`.

    Both carry ``operating_points`` (the referable thresholds chosen on validation, or None).
    """
    if Path(ckpt_path).suffix.lower() == ".onnx":
        if explain:
            raise ConfigurationError(
                "explain=true needs the PyTorch checkpoint (Grad-CAM takes gradients through "
                "the network); pass ckpt_path=<run>/checkpoints/best.ckpt or explain=false"
            )
        return load_onnx(ckpt_path, str(device))
    model, _ = load_model(ckpt_path, device=str(device))
    return model, input_spec(model)


def run_predict(cfg: DictConfig) -> dict[str, Any]:
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
    probs, errors, qualities = predict_paths(
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
    write_predictions(output, paths, probs, errors, qualities, threshold)
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
