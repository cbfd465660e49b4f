"""`InputSpec`: what a trained network expects as input, recorded once with each checkpoint.

Preprocessing (fundus crop, cached size, Ben Graham) then resize and normalisation. The
datamodule states it (`FundusDataModule.input_spec`), the LightningModule stores it in every
checkpoint under `CHECKPOINT_KEY`, and eval, predict and export read it back; an ONNX export
carries the same record in `preprocessing.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from visioncare.data.fundus import LOCALISATION_VERSION
from visioncare.data.preprocess import PreprocessConfig, default_cache_size

log = logging.getLogger("visioncare")

# The checkpoint entry holding `InputSpec.as_dict()`.
CHECKPOINT_KEY = "visioncare_input"

FUNDUS_CROP = (
    "locate the fundus field as a circle intersected with an axis-aligned rectangle with "
    "optionally rounded corners (visioncare.data.fundus.locate_fundus), take the square centred "
    "on the visible field whose side is its longer extent (padding beyond the photo black), "
    "resize to preprocess.size, black out everything outside the field; a photo without a "
    "field is padded whole to a square"
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
                "this model's input spec (checkpoint or preprocessing.json) was recorded with "
                "fundus localisation %r; this version crops with %r. Predictions may differ "
                "slightly from the model's validation; retrain or re-export to record the "
                "current one.",
                found or "bounding box",
                LOCALISATION_VERSION,
            )
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            preprocess=PreprocessConfig.from_dict(values["preprocess"]),
        )


def legacy_input_spec(checkpoint: dict[str, Any]) -> InputSpec | None:
    """The spec of a checkpoint written before `CHECKPOINT_KEY` existed, or None.

    Those stored the run config (`visioncare_config`, whose `data` node holds the preprocessing
    keys) and the backbone's timm data config (`visioncare_data_config`, the fallback mean/std).
    """
    backbone = checkpoint.get("visioncare_data_config")
    if not backbone:
        return None
    data = (checkpoint.get("visioncare_config") or {}).get("data", {})
    image_size = int(data.get("image_size", backbone["input_size"][-1]))
    mean = data.get("mean") or backbone["mean"]
    std = data.get("std") or backbone["std"]
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
