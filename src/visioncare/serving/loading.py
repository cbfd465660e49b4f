"""Rebuild a trained model and its preprocessing from a checkpoint, or from an ONNX export.

Evaluation, prediction and export never consult today's config defaults: the checkpoint carries
the module's constructor arguments (Lightning's `hyper_parameters`), the input spec it was
trained on (`visioncare_input`, see `visioncare.data.input_spec`) and the composed run config
(`visioncare_config`, for the loss and the dataset), so a model trained with `model=tiny` or any
other backbone, image size or crop setting is rebuilt exactly. An exported `model.onnx` travels
with `preprocessing.json`, which plays the same role for `OnnxNet`, the onnxruntime stand-in for
the network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from visioncare import TASKS
from visioncare.data.input_spec import InputSpec
from visioncare.data.preprocess import Prepared, prepare
from visioncare.data.quality import QualityThresholds
from visioncare.data.transforms import build_eval_transform
from visioncare.errors import ConfigurationError
from visioncare.models.module import VisionCareModule
from visioncare.runs.resume import RUN_CONFIG_KEY, check_visioncare_checkpoint

log = logging.getLogger("visioncare")


def load_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[VisionCareModule, dict]:
    """The trained `VisionCareModule` (eval mode) and the run config stored with it.

    The module's `on_load_checkpoint` restores what travels with the weights: the input spec,
    the weights' provenance and the referable operating points.
    """
    checkpoint = check_visioncare_checkpoint(ckpt_path)
    config = checkpoint.get(RUN_CONFIG_KEY) or {}
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    # The weights come from the checkpoint: never download or read the original weights again.
    hparams.update(pretrained=False, weights_path=None)
    loss = instantiate(OmegaConf.create(config["loss"])) if "loss" in config else None
    model = VisionCareModule(**hparams, loss=loss)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    return model.eval().to(device), config


def input_spec(model: VisionCareModule) -> InputSpec:
    """The preprocessing ``model`` was trained with, as recorded in its checkpoint."""
    if model.input_spec is None:
        raise ConfigurationError(
            "the model carries no input spec; load it from a VisionCare checkpoint "
            "(visioncare.serving.loading.load_model)"
        )
    return model.input_spec


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
        # The referable thresholds from preprocessing.json (`visioncare.scoring.referral`), or None.
        self.operating_points: dict[str, Any] | None = None
        # The per-task calibration temperatures from preprocessing.json, or None (uncalibrated).
        self.temperatures: dict[str, float] | None = None
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
    temperatures = info.get("temperatures")
    net.temperatures = {k: float(v) for k, v in temperatures.items()} if temperatures else None
    return net, spec
