"""Prediction on a clinic's own photographs: each file read and preprocessed as the checkpoint
expects, probabilities from a checkpoint or an ONNX file, one CSV row per photo (unreadable ones
included, with their error)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from visioncare import TASKS
from visioncare.data.dicom import dicom_identity
from visioncare.data.input_spec import InputSpec
from visioncare.data.preprocess import UnreadableImageError
from visioncare.data.quality import QualityThresholds
from visioncare.errors import ConfigurationError
from visioncare.scoring.calibration import calibrate
from visioncare.scoring.referral import DEFAULT_THRESHOLD, referable_score
from visioncare.serving.loading import ImagePreprocessor, input_spec, load_model, load_onnx
from visioncare.utils.progress import progress_bar

log = logging.getLogger("visioncare")


def csv_columns() -> list[str]:
    """The output CSV's columns, in order (a contract: see DESIGN.md)."""
    probs = [f"{task}_prob_{k}" for task, n in TASKS.items() for k in range(n)]
    return [
        "image",
        "dr_grade",
        "dme_grade",
        *probs,
        "referable_dr",
        "quality",
        "gradable",
        "camera",
        "error",
    ]


def camera_of(path: Path) -> str:
    """The camera of a DICOM photo (``Manufacturer ManufacturerModelName`` from its header,
    `unknown` without those tags); "" for other files, which do not say."""
    if path.suffix.lower() not in (".dcm", ".dicom"):
        return ""
    return dicom_identity(path).camera or "unknown"


class _ImageFiles(Dataset):
    """Preprocessed tensors for a list of files with their quality flag and gradable verdict
    (`visioncare.data.quality.is_gradable`); an unreadable file yields zeros, empty flags and its
    error."""

    def __init__(self, paths: Sequence[Path], preprocessor: ImagePreprocessor) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        size = preprocessor.spec.image_size
        self.blank = torch.zeros(3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str, str, str]:
        try:
            tensor, prepared = self.preprocessor.prepare(self.paths[index])
        except (UnreadableImageError, OSError) as error:
            return self.blank, index, "", "", str(error) or type(error).__name__
        gradable = "" if prepared.gradable is None else str(prepared.gradable).lower()
        return tensor, index, prepared.quality, gradable, ""


def _rows(
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    qualities: Sequence[str],
    gradable: Sequence[str],
    threshold: float,
) -> Iterator[dict[str, Any]]:
    referable = referable_score(probs["dr"], "dr")
    for i, path in enumerate(paths):
        row: dict[str, Any] = dict.fromkeys(csv_columns(), "")
        row["image"] = str(path)
        row["quality"] = qualities[i]
        row["gradable"] = gradable[i]
        row["camera"] = camera_of(Path(path))
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
) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
    """Calibrated probabilities per task (the model's ``temperatures`` applied to its softmax;
    rows of failed files are NaN), per-file error texts, quality flags and gradable verdicts
    (`visioncare.data.quality`: "true"/"false"; empty for failed files).

    ``model`` maps a batch of images to logits per task: a `VisionCareModule` already in eval
    mode on ``device``, or an `OnnxNet`. A doubtful photo is still predicted: its flag says so.
    """
    dataset = _ImageFiles(paths, ImagePreprocessor(spec, thresholds))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    probs = {task: torch.full((len(paths), n), float("nan")) for task, n in TASKS.items()}
    errors = [""] * len(paths)
    qualities = [""] * len(paths)
    gradable = [""] * len(paths)
    with progress_bar() as progress, torch.inference_mode():
        bar = progress.add_task("Predicting", total=len(paths))
        for images, indices, flags, verdicts, messages in loader:
            ok = torch.tensor([not m for m in messages], dtype=torch.bool)
            rows = zip(indices.tolist(), flags, verdicts, messages, strict=True)
            for index, flag, verdict, message in rows:
                errors[index] = message
                qualities[index] = flag
                gradable[index] = verdict
            if ok.any():
                logits = model(images[ok].to(device))
                for task in TASKS:
                    probs[task][indices[ok]] = logits[task].float().softmax(dim=1).cpu()
            progress.advance(bar, len(indices))
    temperatures = getattr(model, "temperatures", None)
    if temperatures is None:
        log.warning(
            "The model stores no calibration temperatures (trained before calibration, or "
            "calibration=none): probabilities are the uncalibrated softmax"
        )
    return calibrate(probs, temperatures), errors, qualities, gradable


def write_predictions(
    output: Path,
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    qualities: Sequence[str],
    gradable: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """The prediction CSV (columns: `csv_columns()`).

    ``referable_dr`` is P(DR >= 2) >= ``threshold`` (the checkpoint's validation operating point).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns())
        writer.writeheader()
        writer.writerows(_rows(paths, probs, errors, qualities, gradable, threshold))


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
