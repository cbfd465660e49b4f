"""Grad-CAM overlays of the predicted grades, for `predict.py explain=true` and training previews.

Its own module because batch prediction (`visioncare.tasks.predict`) and training
(`visioncare.tasks.train`) both draw overlays, and neither should import the other for it.
pytorch-grad-cam is imported only where an overlay is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from visioncare import TASKS
from visioncare.data.fundus import FundusField, field_in_crop, field_mask
from visioncare.data.input_spec import InputSpec
from visioncare.data.preprocess import Prepared, prepare
from visioncare.errors import ConfigurationError
from visioncare.serving.loading import ImagePreprocessor
from visioncare.utils.progress import progress_bar


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
        with progress_bar() as progress:
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
