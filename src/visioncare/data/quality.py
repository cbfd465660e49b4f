"""Cheap image-quality flags for a located fundus: is this photo worth trusting a grade from?

Measured on the field only (never the black surround), on a fixed-size crop so the numbers mean
the same for a 4288 px photo and a 640 px one. The prediction is always made; the flag tells a
reader which rows to look at again. How the thresholds were chosen is in `QualityThresholds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from visioncare.data.fundus import FundusField, crop_to_field, field_in_crop, field_mask
from visioncare.errors import ConfigurationError

ANALYSIS_SIZE = 256  # px: side of the crop the measures are taken on
OK = "ok"
NO_FUNDUS = "no_fundus_found"
# The flags after which a grade cannot be trusted (see `is_gradable`).
UNGRADABLE_FLAGS = frozenset({NO_FUNDUS, "too_dark", "overexposed", "blurred"})


@dataclass(frozen=True)
class QualityThresholds:
    """Limits behind each flag (conf/quality/default.yaml).

    Chosen on scikit-image's real `retina.jpg` (1411 px) and on versions of it degraded in code;
    tests/test_quality.py re-measures them. Clean, the photo measures mean luminance ≈ 118,
    0 % of the field with a clipped green channel and sharpness ≈ 0.19. Each limit sits between
    two degradation steps:

    Attributes:
        too_dark: mean luminance (0-255) of the field below this. Scaling the photo's pixels by
            0.25 measures ≈ 29, by 0.2 ≈ 23: the limit flags 0.2 and darker.
        overexposed_luminance: mean luminance above this. ×1.6 measures ≈ 165 (washed out, not
            flagged), ×2 ≈ 186 (flagged).
        overexposed_clipped: share of field pixels whose green channel (the one lesions show
            in) is >= 250 above this. ×2 clips 2 %, ×2.5 clips 14 % (flagged).
        blurred: contrast-normalised sharpness (variance of the Laplacian of the green channel
            / its mean², inside the field, at 256 px) below this. A Gaussian blur of σ = 4 px on
            the 1411 px photo measures ≈ 0.05 (not flagged), σ = 6 px ≈ 0.019 (flagged):
            about one pixel of blur at 256 px, where microaneurysms are 2-5 px wide.
        min_diameter: field diameter in the original photo's pixels below this means the crop
            is upsampled: flagged `small_field` (0 = use the cache size).
    """

    too_dark: float = 25.0
    overexposed_luminance: float = 175.0
    overexposed_clipped: float = 0.05
    blurred: float = 0.03
    min_diameter: int = 0

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None) -> QualityThresholds:
        """The `quality.*` keys of a config; an unknown key is a `ConfigurationError`."""
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigurationError(
                f"quality.{unknown[0]} is not a quality threshold; the keys are "
                f"{', '.join(f'quality.{k}' for k in known)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class QualityMeasures:
    """The numbers the flags are computed from."""

    luminance: float
    clipped: float
    sharpness: float


def measure(image: np.ndarray, field: FundusField) -> QualityMeasures:
    """Mean luminance, share of clipped pixels and sharpness of the field of an RGB photo."""
    crop = crop_to_field(image, field, ANALYSIS_SIZE)
    local = field_in_crop(field, ANALYSIS_SIZE)
    shrink = 0.95  # keep the field's soft rim out of the measures
    local = replace(local, radius=local.radius * shrink)
    inside = field_mask((ANALYSIS_SIZE, ANALYSIS_SIZE), local).astype(bool)
    inside &= crop.max(axis=2) > 0  # not above/below the cuts
    if inside.sum() < 100:
        return QualityMeasures(0.0, 0.0, 0.0)
    luminance = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
    green = crop[..., 1].astype(np.float32)
    laplacian = cv2.Laplacian(green, cv2.CV_32F, ksize=3)
    # The Laplacian near the black surround measures the field's edge, not the retina.
    core = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    mean_green = float(green[core].mean()) if core.any() else 0.0
    sharpness = float(laplacian[core].var()) / max(mean_green, 1.0) ** 2 if core.any() else 0.0
    return QualityMeasures(
        luminance=float(luminance[inside].mean()),
        clipped=float((crop[..., 1][inside] >= 250).mean()),
        sharpness=sharpness,
    )


def assess(
    image: np.ndarray,
    field: FundusField | None,
    thresholds: QualityThresholds,
    min_diameter: float,
    scale: float = 1.0,
) -> str:
    """`ok`, or the reasons the photo is doubtful joined by ``;`` (e.g. ``too_dark;blurred``).

    Args:
        image: the decoded RGB photo the field was located on.
        field: the located field in ``image``'s pixels, or None.
        thresholds: the limits.
        min_diameter: smallest field diameter in original pixels (used when the thresholds'
            own `min_diameter` is 0).
        scale: original photo pixels per ``image`` pixel (reduced JPEG decoding).
    """
    if field is None:
        return NO_FUNDUS
    reasons: list[str] = []
    limit = thresholds.min_diameter or min_diameter
    if 2 * field.radius * scale < limit:
        reasons.append("small_field")
    values = measure(image, field)
    if values.luminance < thresholds.too_dark:
        reasons.append("too_dark")
    if (
        values.luminance > thresholds.overexposed_luminance
        or values.clipped > thresholds.overexposed_clipped
    ):
        reasons.append("overexposed")
    if values.sharpness < thresholds.blurred and values.luminance >= thresholds.too_dark:
        reasons.append("blurred")  # a dark photo is low-contrast too: report the cause
    return ";".join(reasons) or OK


def is_gradable(quality: str) -> bool:
    """Whether a grade made from a photo with this `assess` result can be trusted.

    The rule: gradable = the fundus field was found and none of `UNGRADABLE_FLAGS` is raised.
    `no_fundus_found` means the network saw the whole frame, not a located retina; `too_dark`,
    `overexposed` and `blurred` mean the lesions that set the grade (microaneurysms, exudates,
    haemorrhages, 2-5 px at 256 px) may be invisible, so a "no DR" cannot be told from "not
    seen". `small_field` alone stays gradable: the whole field reaches the network, only
    upsampled; it is flagged so a reader can look again. A reader who wants it stricter can
    test the flags themselves (``quality.split(";")``).

    Args:
        quality: ``ok`` or flags joined by ``;`` (`assess`'s result).
    """
    return not (set(quality.split(";")) & UNGRADABLE_FLAGS)
