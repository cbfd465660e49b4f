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
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from visioncare import TASKS
from visioncare.data.fundus import FundusField, field_in_crop, field_mask
from visioncare.data.inputs import collect_images
from visioncare.data.preprocess import Prepared, UnreadableImageError, prepare
from visioncare.data.quality import QualityThresholds
from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.inference import (
    ImagePreprocessor,
    InputSpec,
    OnnxNet,
    input_spec,
    load_model,
    load_onnx,
)
from visioncare.referral import DEFAULT_THRESHOLD, referable_score, threshold_for

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


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


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
    with _progress() as progress, torch.inference_mode():
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


# --------------------------------------------------------------------------- Grad-CAM


class BothTaskLogits(nn.Module):
    """DR and DME logits side by side, (N, 5 + 3): one output tensor serves both tasks' CAMs.

    Grad-CAM needs a model with a single output; with both tasks in it, one `GradCAM` object
    and one forward/backward pass explain a batch for DR and DME at once (`cam_targets`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        return torch.cat([logits[task] for task in TASKS], dim=1)


def cam_targets(probs: dict[str, Tensor], indices: Sequence[int]) -> list[tuple[str, int]]:
    """(task, column of `BothTaskLogits`) per CAM sample: each image once per task, task-major."""
    offsets = dict(zip(TASKS, np.cumsum([0, *TASKS.values()])[:-1].tolist(), strict=True))
    return [(task, offsets[task] + int(probs[task][i].argmax())) for task in TASKS for i in indices]


def find_target_layer(backbone: nn.Module, image_size: int) -> nn.Module:
    """The backbone's last module with a spatial (N, C, H, W) output: its last feature map.

    Found by running a dummy image with forward hooks rather than by attribute names, so it
    works for any timm family (EfficientNet `bn2`, ResNet `layer4`, ConvNeXt `stages`...).
    Hooks fire after a module's children, so the last firing is the deepest. Outputs with
    H = W = 1 are skipped: those are the global pool / head norm, where a CAM has no map. The
    dummy is at least 224 px so small training sizes still leave a spatial map at the top.
    """
    last: list[nn.Module] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
            last.append(module)

    handles = [m.register_forward_hook(hook) for m in backbone.modules() if m is not backbone]
    was_training = backbone.training
    parameter = next(backbone.parameters())
    try:
        backbone.eval()
        with torch.no_grad():
            size = max(image_size, 224)
            backbone(torch.zeros(1, 3, size, size, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    if not last:
        raise ConfigurationError("explain=true: the backbone has no 4-D feature map for Grad-CAM")
    return last[-1]


def _overlay(base: np.ndarray, heat: np.ndarray, field: FundusField | None) -> np.ndarray:
    """The CAM blended onto the cropped fundus, inside the field only (outside stays black)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size = base.shape[0]
    heat = cv2.resize(heat.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    overlay = show_cam_on_image(base.astype(np.float32) / 255.0, heat, use_rgb=True)
    if field is not None:
        overlay *= field_mask((size, size), field_in_crop(field, size))[..., None]
    return overlay


def write_gradcam(
    model: nn.Module,
    spec: InputSpec,
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    out_dir: Path,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    size: int = 512,
) -> list[Path]:
    """Grad-CAM overlays for the predicted grades, `<stem>_<task>.png`, on the cropped fundus.

    Overlays are drawn on the fundus square the network saw (field circle centred and filling
    it, outside black) at ``size`` px, so nothing is squashed and a grader sees the same framing
    as the model, sharper. One `GradCAM` object over `BothTaskLogits` explains ``batch_size``
    images for both tasks in one forward/backward pass.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(device)
    layer = find_target_layer(model.net.backbone, spec.image_size)
    preprocessor = ImagePreprocessor(spec)
    display = replace(spec.preprocess, size=size, ben_graham=False)
    written: list[Path] = []
    todo = [i for i in range(len(paths)) if not errors[i]]
    cam = GradCAM(model=BothTaskLogits(model), target_layers=[layer])
    try:
        with _progress() as progress:
            bar = progress.add_task("Grad-CAM", total=len(todo))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                inputs = torch.stack([preprocessor(paths[i]) for i in chunk])
                shown: list[Prepared] = [prepare(paths[i], display) for i in chunk]
                targets = cam_targets(probs, chunk)
                # Both tasks in one batch; input gradients keep the graph alive even when the
                # backbone was left frozen.
                batch = torch.cat([inputs] * len(TASKS)).to(device).requires_grad_(True)
                heats = cam(
                    input_tensor=batch,
                    targets=[ClassifierOutputTarget(column) for _, column in targets],
                )
                for k, (task, _) in enumerate(targets):
                    j = k % len(chunk)
                    overlay = _overlay(shown[j].image, heats[k], shown[j].field)
                    path = out_dir / f"{paths[chunk[j]].stem}_{task}.png"
                    cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                    written.append(path)
                progress.advance(bar, len(chunk))
    finally:
        cam.activations_and_grads.release()
    return written


def gradcam_examples(
    model: nn.Module, spec: InputSpec, paths: Sequence[Path], out_dir: Path
) -> list[Path]:
    """Grad-CAM overlays of a few images for the predicted grades (end-of-training preview)."""
    device = next(model.parameters()).device
    preprocessor = ImagePreprocessor(spec)
    with torch.no_grad():
        logits = model.eval()(torch.stack([preprocessor(p) for p in paths]).to(device))
    probs = {task: value.softmax(dim=1).cpu() for task, value in logits.items()}
    return write_gradcam(model, spec, paths, probs, [""] * len(paths), out_dir, device)


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
    model, config = load_model(ckpt_path, device=str(device))
    return model, input_spec(model, config)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The `predict` task: checkpoint + input → CSV (+ Grad-CAM overlays with explain=true)."""
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
