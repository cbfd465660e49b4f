"""PNG plots into TensorBoard's IMAGES tab, from training runs and from eval.py's run directory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2


def log_png_images(experiment: Any, paths: Iterable[Path], prefix: str, step: int = 0) -> None:
    """Add each PNG as an image tagged ``<prefix>/<file stem>`` to a SummaryWriter-like
    ``experiment`` (a TensorBoardLogger's `.experiment`, or `torch.utils.tensorboard`'s)."""
    for path in paths:
        image = cv2.imread(str(path))
        if image is None:
            continue
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        experiment.add_image(f"{prefix}/{Path(path).stem}", rgb, step, dataformats="HWC")


def write_png_images(log_dir: Path, paths: Iterable[Path], prefix: str) -> None:
    """The same into an event file of its own under ``log_dir`` (eval.py has no logger), so
    `make tensorboard` over logs/ shows an evaluation's plots beside the training runs."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        log_png_images(writer, paths, prefix)
    finally:
        writer.close()
