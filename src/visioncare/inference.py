"""Rebuild a trained model and its preprocessing from a checkpoint alone.

Evaluation, prediction and export never consult today's config defaults: the checkpoint carries
the composed run config (`visioncare_config`) and the backbone's data config, so a model trained
with `model=tiny` or any other backbone, image size or crop setting is rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from visioncare.data.preprocess import PreprocessConfig, preprocess
from visioncare.data.transforms import build_eval_transform
from visioncare.models.module import VisionCareModule
from visioncare.utils.checkpoints import check_visioncare_checkpoint


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: preprocessing (crop, cache size) then resize + normalise."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: PreprocessConfig

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocess": self.preprocess.as_dict(),
            "channel_order": "RGB",
            "layout": "NCHW",
            "scale": "pixel / 255, then (x - mean) / std",
        }


def load_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[VisionCareModule, dict]:
    """The trained `VisionCareModule` (eval mode) and the run config stored with it."""
    checkpoint = check_visioncare_checkpoint(ckpt_path)
    config = checkpoint.get("visioncare_config") or {}
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    # The weights come from the checkpoint: never download or read the original weights again.
    hparams.update(pretrained=False, weights_path=None)
    loss = instantiate(OmegaConf.create(config["loss"])) if "loss" in config else None
    model = VisionCareModule(**hparams, loss=loss)
    model.load_state_dict(checkpoint["state_dict"])
    model.run_config = config
    return model.eval().to(device), config


def input_spec(model: VisionCareModule, config: dict) -> InputSpec:
    """The preprocessing the checkpoint was trained with (falls back to the backbone's)."""
    data = config.get("data", {})
    mean = data.get("mean") or model.net.data_config["mean"]
    std = data.get("std") or model.net.data_config["std"]
    image_size = int(data.get("image_size", model.net.data_config["input_size"][-1]))
    return InputSpec(
        image_size=image_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        preprocess=PreprocessConfig(
            size=int(data.get("cache_size", image_size)),
            crop_fundus=bool(data.get("crop_fundus", True)),
            ben_graham=bool(data.get("ben_graham", False)),
        ),
    )


class ImagePreprocessor:
    """File → normalised CHW tensor, exactly as validation images were prepared in training."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.transform = build_eval_transform(spec.image_size, spec.mean, spec.std)

    def __call__(self, path: str | Path) -> torch.Tensor:
        image: np.ndarray = preprocess(path, self.spec.preprocess)
        return self.transform(image=image)["image"]
