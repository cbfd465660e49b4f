"""Benchmark: Grad-CAM overlays (`predict.py explain=true`), batched against one image at a time.

Until this version `predict.py explain=true` explained one photo at a time: per photo and task a
batch-1 forward/backward through a task-specific `GradCAM`, then the CAM mapped onto the full
photo, blended and written as a full-resolution PNG — about 5 s per photo on 2 cores. The
reference loop below reproduces that work (same network, same preprocessing, same overlay
library calls) so the two can be timed side by side on this machine.

`visioncare.serving.explain.write_gradcam` now explains ``--batch-size`` photos for both tasks in
one forward/backward of one `GradCAM` object and draws on the cropped fundus at ``--overlay-size``.

Model: one training step of ``--backbone`` at ``--image-size`` (the real pipeline,
`bench/inference.make_checkpoint`). Photos: scikit-image's real `retina.jpg` placed in
``--photo-width`` × 3/4 frames as JPEG, as a camera writes them. The two methods alternate for
``--rounds`` rounds; each figure is the median. Budget: batched at least 5× faster. A report,
not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from common import Row, machine_line, print_table, quiet, ratio_row, save_rows
from inference import alternate, make_checkpoint, timed
from skimage import data
from torch import Tensor, nn

from visioncare import TASKS
from visioncare.data.input_spec import InputSpec
from visioncare.serving.explain import find_target_layer, write_gradcam
from visioncare.serving.loading import ImagePreprocessor, input_spec, load_model

TARGET_SPEEDUP = 5.0


def write_photos(folder: Path, count: int, width: int) -> list[Path]:
    """``count`` JPEG photos: the real retina photo, shifted a little each, in a 4:3 frame."""
    folder.mkdir(parents=True, exist_ok=True)
    height = width * 3 // 4
    side = int(height * 0.95)
    retina = cv2.resize(data.retina(), (side, side), interpolation=cv2.INTER_AREA)
    paths = []
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        x = (width - side) // 2 + (i - count // 2) * width // 100
        y = (height - side) // 2
        frame[y : y + side, x : x + side] = retina
        path = folder / f"photo_{i:02d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


class _OneTask(nn.Module):
    """One task's logits (what the per-image loop gave each task's `GradCAM`)."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)[self.task]


def per_image_reference(
    model: nn.Module, spec: InputSpec, paths: Sequence[Path], probs: dict[str, Tensor], out: Path
) -> None:
    """The previous `write_gradcam` loop: batch 1 per task, overlays on the full-size photo."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from visioncare.data.preprocess import read_image

    out.mkdir(parents=True, exist_ok=True)
    layer = find_target_layer(model.net.backbone, spec.image_size)
    preprocessor = ImagePreprocessor(spec)
    cams = {task: GradCAM(model=_OneTask(model, task), target_layers=[layer]) for task in TASKS}
    try:
        for i, path in enumerate(paths):
            tensor = preprocessor(path)[None].requires_grad_(True)
            original = read_image(path)
            base = original.astype(np.float32) / 255.0
            for task, cam in cams.items():
                target = ClassifierOutputTarget(int(probs[task][i].argmax()))
                heat = cam(input_tensor=tensor, targets=[target])[0]
                height, width = original.shape[:2]
                heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
                overlay = show_cam_on_image(base, heat, use_rgb=True)
                cv2.imwrite(str(out / f"{path.stem}_{task}.png"), overlay[..., ::-1])
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()


def measure(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as name:
        tmp = Path(name)
        with quiet():
            ckpt = make_checkpoint(tmp, args)
        model, _ = load_model(ckpt, "cpu")
        spec = input_spec(model)
        photos = write_photos(tmp / "photos", args.images, args.photo_width)
        preprocessor = ImagePreprocessor(spec)
        with torch.no_grad():
            logits = model(torch.stack([preprocessor(p) for p in photos]))
        probs = {task: value.softmax(dim=1) for task, value in logits.items()}
        errors = [""] * len(photos)

        def batched() -> None:
            with quiet():
                write_gradcam(
                    model, spec, photos, probs, errors, tmp / "batched",
                    batch_size=args.batch_size, size=args.overlay_size,
                )  # fmt: skip

        def reference() -> None:
            with quiet():
                per_image_reference(model, spec, photos, probs, tmp / "reference")

        seconds = alternate(
            {"per-image loop": timed(reference), "batched": timed(batched)}, args.rounds
        )
    per_photo = {name: value / len(photos) for name, value in seconds.items()}
    setting = f"{args.backbone} {args.image_size} px, {len(photos)} photos {args.photo_width} px"
    return [
        Row(
            f"Grad-CAM, previous per-image loop ({setting}, full-size overlays)",
            f"{per_photo['per-image loop']:.2f} s/photo",
        ),
        Row(
            f"Grad-CAM, batched (b{args.batch_size}, {args.overlay_size} px overlays)",
            f"{per_photo['batched']:.2f} s/photo",
        ),
        ratio_row(
            "Batched ÷ per-image loop",
            seconds["per-image loop"] / seconds["batched"],
            TARGET_SPEEDUP,
        ),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Grad-CAM benchmark, batched vs per image (a report: always exits 0)."
    )
    parser.add_argument(
        "--backbone", default="tf_efficientnetv2_s", help="timm model (tf_efficientnetv2_s)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="network input (224)")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per CAM pass (8)")
    parser.add_argument("--images", type=int, default=8, help="photos explained (8)")
    parser.add_argument("--photo-width", type=int, default=2048, help="photo width px (2048)")
    parser.add_argument("--overlay-size", type=int, default=512, help="overlay side px (512)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    # make_checkpoint's synthetic set: a few test photos at a small render size suffice.
    args.render_size = 128
    if min(args.image_size, args.batch_size, args.images, args.rounds, args.photo_width) < 1:
        parser.error("sizes, counts and rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    print(f"VisionCare Grad-CAM benchmark — {machine_line()}\n", flush=True)
    rows = measure(args)
    print_table(rows)
    save_rows(args.json, "Grad-CAM", rows)
    print(f"\nTotal {time.perf_counter() - began:.0f} s (incl. one training step).")
    return 0  # a report: budgets are printed, never enforced through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
