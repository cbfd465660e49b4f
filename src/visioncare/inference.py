"""Rebuild a trained model and its preprocessing from a checkpoint, or from an ONNX export.

Evaluation, prediction and export never consult today's config defaults: the checkpoint carries
the composed run config (`visioncare_config`) and the backbone's data config, so a model trained
with `model=tiny` or any other backbone, image size or crop setting is rebuilt exactly. An
exported `model.onnx` travels with `preprocessing.json`, which plays the same role for
`OnnxNet`, the onnxruntime stand-in for the network.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from visioncare import TASKS
from visioncare.data.fundus import LOCALISATION_VERSION
from visioncare.data.preprocess import Prepared, PreprocessConfig, default_cache_size, prepare
from visioncare.data.quality import QualityThresholds
from visioncare.data.transforms import build_eval_transform
from visioncare.errors import ConfigurationError
from visioncare.models.module import VisionCareModule
from visioncare.referral import CHECKPOINT_KEY as OPERATING_POINTS_KEY
from visioncare.utils.checkpoints import check_visioncare_checkpoint

log = logging.getLogger("visioncare")

FUNDUS_CROP = (
    "locate the fundus field as a circle plus straight top/bottom cuts "
    "(visioncare.data.fundus.locate_fundus), take the square around the circle (padding "
    "beyond the photo black), resize to preprocess.size, black out everything outside the "
    "field; a photo without a field is padded whole to a square"
)


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
            "fundus_crop": FUNDUS_CROP if self.preprocess.crop_fundus else "none: pad to square",
            "channel_order": "RGB",
            "layout": "NCHW",
            "scale": "pixel / 255, then (x - mean) / std",
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputSpec:
        """The inverse of `as_dict` (extra keys, such as the export's output names, ignored)."""
        found = values["preprocess"].get("localisation")
        if found != LOCALISATION_VERSION:
            # Older exports cropped to a bounding box; that code is gone, so say what changed.
            log.warning(
                "preprocessing.json was written with fundus localisation %r; this version "
                "crops with %r. Predictions may differ slightly from the exported model's "
                "validation; re-export to record the current one.",
                found or "bounding box",
                LOCALISATION_VERSION,
            )
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            preprocess=PreprocessConfig.from_dict(values["preprocess"]),
        )


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
    model.operating_points = checkpoint.get(OPERATING_POINTS_KEY)
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
            # null in the run config = derived from image_size, exactly as the datamodule did.
            size=int(data.get("cache_size", image_size) or default_cache_size(image_size)),
            crop_fundus=bool(data.get("crop_fundus", True)),
            ben_graham=bool(data.get("ben_graham", False)),
        ),
    )


class ImagePreprocessor:
    """File → normalised CHW tensor, exactly as validation images were prepared in training.

    Args:
        spec: the checkpoint's input spec.
        thresholds: quality limits for `prepare`'s flag (None: defaults).
    """

    def __init__(self, spec: InputSpec, thresholds: QualityThresholds | None = None) -> None:
        self.spec = spec
        self.thresholds = thresholds or QualityThresholds()
        self.transform = build_eval_transform(spec.image_size, spec.mean, spec.std)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return self.prepare(path)[0]

    def prepare(self, path: str | Path) -> tuple[torch.Tensor, Prepared]:
        """The network input and the prepared photo it came from (field, quality)."""
        prepared = prepare(path, self.spec.preprocess, self.thresholds)
        image: np.ndarray = prepared.image
        return self.transform(image=image)["image"], prepared


class OnnxNet:
    """An exported `model.onnx` run by onnxruntime, called like the network: images → logits.

    `predict.py ckpt_path=<export>/model.onnx` uses it, so a deployment can be checked with the
    very file it will serve. Inputs are NCHW float32 tensors; outputs are CPU tensors per task.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        # The referable thresholds from preprocessing.json (`visioncare.referral`), or None.
        self.operating_points: dict[str, Any] | None = None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [f"{task}_logits" for task in TASKS]
        found = [output.name for output in self.session.get_outputs()]
        if sorted(found) != sorted(self.output_names):
            raise ConfigurationError(
                f"{path} has outputs {found}, not {self.output_names}: it is not a VisionCare "
                "export; re-run `python src/export.py`"
            )

    @property
    def provider(self) -> str:
        """Where onnxruntime runs the model (CPUExecutionProvider unless a GPU build is used)."""
        return self.session.get_providers()[0]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: images.detach().cpu().float().numpy()}
        outputs = self.session.run(self.output_names, feed)
        return {task: torch.from_numpy(out) for task, out in zip(TASKS, outputs, strict=True)}


def onnx_preprocessing(model_path: Path) -> tuple[InputSpec, dict[str, Any]]:
    """The `InputSpec` and the whole `preprocessing.json` export writes beside `model.onnx`.

    The file also carries the referable operating points chosen on validation.
    """
    spec_path = model_path.with_name("preprocessing.json")
    if not model_path.is_file():
        raise ConfigurationError(f"ckpt_path={str(model_path)!r} does not exist")
    if not spec_path.is_file():
        raise ConfigurationError(
            f"{spec_path} is missing: an ONNX model needs the preprocessing.json that "
            "`python src/export.py` writes beside model.onnx (copy both together)"
        )
    try:
        info = json.loads(spec_path.read_text())
        return InputSpec.from_dict(info), info
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(
            f"{spec_path} is not a VisionCare preprocessing file ({error}); re-run export"
        ) from None


def onnx_input_spec(model_path: Path) -> InputSpec:
    """The `InputSpec` in the `preprocessing.json` that export writes beside `model.onnx`."""
    return onnx_preprocessing(model_path)[0]


def load_onnx(path: str | Path, device: str = "cpu") -> tuple[OnnxNet, InputSpec]:
    """`OnnxNet` and the `InputSpec` from the `preprocessing.json` written beside it by export."""
    model_path = Path(path).expanduser()
    spec, info = onnx_preprocessing(model_path)
    try:
        net = OnnxNet(model_path, device)
    except ConfigurationError:
        raise
    except ImportError as error:
        raise ConfigurationError(
            f"predicting from {model_path} needs onnxruntime ({error}); pip install onnxruntime"
        ) from None
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise ConfigurationError(
            f"onnxruntime could not load {model_path}: {error}. Re-run `python src/export.py`."
        ) from None
    # The referable thresholds chosen on validation (None: not stored).
    net.operating_points = info.get("operating_points")
    return net, spec
