"""Batch prediction: images (folder, glob or CSV) → one CSV row per image, optional Grad-CAM.

The model and its preprocessing are rebuilt from the checkpoint alone (`visioncare.inference`),
so predictions use exactly the crop, resize and normalisation the network was validated with.
A file that cannot be decoded never stops the run: it gets a row with `error` set and empty
predictions, because one corrupt photo in a clinic's export folder must not lose the others.
"""

from __future__ import annotations

import csv
import glob
import logging
from collections.abc import Callable, Iterator, Sequence
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
from visioncare.data.preprocess import UnreadableImageError, read_image
from visioncare.errors import ConfigurationError
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm")


def csv_columns() -> list[str]:
    """The output CSV's columns, in order (a contract: see DESIGN.md)."""
    probs = [f"{task}_prob_{k}" for task, n in TASKS.items() for k in range(n)]
    return ["image", "dr_grade", "dme_grade", *probs, "referable_dr", "error"]


# --------------------------------------------------------------------------- inputs


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(source: str | Path) -> list[Path]:
    """Image paths from a folder (recursive), a glob pattern or a CSV with an `image` column.

    CSV paths that are relative are resolved against the CSV's folder, so a CSV travels with its
    images. CSV rows are kept as listed (a missing file there gets an error row, not silence);
    folders and globs keep image files only, sorted for a reproducible output order.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if _is_image(p))
    elif path.is_file() and path.suffix.lower() == ".csv":
        images = _images_from_csv(path)
    elif path.is_file():
        images = [path]
    else:
        images = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
    if not images:
        raise ConfigurationError(
            f"input={text!r} matches no image file ({', '.join(IMAGE_EXTENSIONS)}); give a folder, "
            "a glob such as 'photos/*.jpg' (quoted) or a CSV with an 'image' column"
        )
    return images


def _images_from_csv(path: Path) -> list[Path]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "image" not in (reader.fieldnames or []):
            raise ConfigurationError(
                f"input={str(path)!r}: the CSV has no 'image' column (columns: {reader.fieldnames})"
            )
        names = [row["image"].strip() for row in reader if (row.get("image") or "").strip()]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, names)]


class _ImageFiles(Dataset):
    """Preprocessed tensors for a list of files; an unreadable file yields zeros + its error."""

    def __init__(self, paths: Sequence[Path], preprocessor: ImagePreprocessor) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        size = preprocessor.spec.image_size
        self.blank = torch.zeros(3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        try:
            return self.preprocessor(self.paths[index]), index, ""
        except (UnreadableImageError, OSError) as error:
            return self.blank, index, str(error) or type(error).__name__


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
    paths: Sequence[Path], probs: dict[str, Tensor], errors: Sequence[str], threshold: float
) -> Iterator[dict[str, Any]]:
    referable = referable_score(probs["dr"], "dr")
    for i, path in enumerate(paths):
        row: dict[str, Any] = dict.fromkeys(csv_columns(), "")
        row["image"] = str(path)
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
) -> tuple[dict[str, Tensor], list[str]]:
    """Softmax probabilities per task (rows of failed files are NaN) and per-file error texts.

    ``model`` maps a batch of images to logits per task: a `VisionCareModule` already in eval
    mode on ``device``, or an `OnnxNet`.
    """
    dataset = _ImageFiles(paths, ImagePreprocessor(spec))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    probs = {task: torch.full((len(paths), n), float("nan")) for task, n in TASKS.items()}
    errors = [""] * len(paths)
    with _progress() as progress, torch.inference_mode():
        bar = progress.add_task("Predicting", total=len(paths))
        for images, indices, messages in loader:
            ok = torch.tensor([not m for m in messages], dtype=torch.bool)
            for index, message in zip(indices.tolist(), messages, strict=True):
                errors[index] = message
            if ok.any():
                logits = model(images[ok].to(device))
                for task in TASKS:
                    probs[task][indices[ok]] = logits[task].float().softmax(dim=1).cpu()
            progress.advance(bar, len(indices))
    return probs, errors


def write_predictions(
    output: Path,
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """The prediction CSV (columns: `csv_columns()`).

    ``referable_dr`` is P(DR >= 2) >= ``threshold`` (the checkpoint's validation operating point).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns())
        writer.writeheader()
        writer.writerows(_rows(paths, probs, errors, threshold))


# --------------------------------------------------------------------------- Grad-CAM


class TaskLogits(nn.Module):
    """One task's logits only: Grad-CAM needs a model with a single output tensor."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)[self.task]


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


def _cam_in_original_frame(cam: np.ndarray, original: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Map a CAM over the preprocessed (cropped, square-padded) image back onto the original.

    Mirrors `crop_to_fundus`: the CAM covers the padded square around the fundus bounding box,
    so it is resized to that square, un-padded and placed at the box; outside it is 0.
    """
    height, width = original.shape[:2]
    threshold = spec.preprocess.threshold if spec.preprocess.crop_fundus else -1
    mask = original.max(axis=2) > threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size < 8 or cols.size < 8:
        r0, r1, c0, c1 = 0, height, 0, width
    else:
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box_h, box_w = r1 - r0, c1 - c0
    side = max(box_h, box_w)
    top, left = (side - box_h) // 2, (side - box_w) // 2
    square = cv2.resize(cam.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    full = np.zeros((height, width), dtype=np.float32)
    full[r0:r1, c0:c1] = square[top : top + box_h, left : left + box_w]
    return full


def write_gradcam(
    model: nn.Module,
    spec: InputSpec,
    paths: Sequence[Path],
    probs: dict[str, Tensor],
    errors: Sequence[str],
    out_dir: Path,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Grad-CAM overlays for the predicted class, `<stem>_<task>.png`, at the input's size.

    Overlays are drawn on the original photo (not the 224-px network input) so a grader can
    compare the highlighted regions with the full-resolution image.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(device)
    layer = find_target_layer(model.net.backbone, spec.image_size)
    preprocessor = ImagePreprocessor(spec)
    written: list[Path] = []
    todo = [i for i in range(len(paths)) if not errors[i]]
    cams = {task: GradCAM(model=TaskLogits(model, task), target_layers=[layer]) for task in TASKS}
    try:
        with _progress() as progress:
            bar = progress.add_task("Grad-CAM", total=len(todo))
            for i in todo:
                # Input gradients keep the graph alive even if the backbone was left frozen.
                tensor = preprocessor(paths[i])[None].to(device).requires_grad_(True)
                original = read_image(paths[i])
                base = original.astype(np.float32) / 255.0
                for task, cam in cams.items():
                    target = ClassifierOutputTarget(int(probs[task][i].argmax()))
                    heat = cam(input_tensor=tensor, targets=[target])[0]
                    heat = _cam_in_original_frame(heat, original, spec)
                    overlay = show_cam_on_image(base, heat, use_rgb=True)
                    path = out_dir / f"{paths[i].stem}_{task}.png"
                    cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                    written.append(path)
                progress.advance(bar)
    finally:
        for cam in cams.values():
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
    device = resolve_device(str(cfg.get("device", "auto")))
    model, spec = load_predictor(str(cfg.ckpt_path), device, explain=bool(cfg.get("explain")))
    paths = collect_images(cfg.input)
    if isinstance(model, OnnxNet):
        device = torch.device("cpu")  # onnxruntime takes host arrays; it places the work itself
        engine = f"onnxruntime ({model.provider})"
    else:
        engine = f"PyTorch on {device}"
    log.info("Predicting %d image(s) with %s", len(paths), engine)
    probs, errors = predict_paths(
        model, spec, paths, int(cfg.batch_size), int(cfg.num_workers), device
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
    write_predictions(output, paths, probs, errors, threshold)
    failed = sum(bool(e) for e in errors)
    if failed:
        log.warning(
            "%d of %d image(s) could not be read (see the 'error' column)", failed, len(paths)
        )
    log.info("Predictions: %s", output)
    result: dict[str, Any] = {"output": str(output), "num_images": len(paths), "num_errors": failed}
    if cfg.get("explain"):
        explain_dir = _resolve_output(str(cfg.explain_dir), output_dir)
        overlays = write_gradcam(model, spec, paths, probs, errors, explain_dir, device)
        log.info("Grad-CAM overlays (%d): %s", len(overlays), explain_dir)
        result["explain_dir"] = str(explain_dir)
    return result
