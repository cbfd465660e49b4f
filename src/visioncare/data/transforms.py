"""Augmentation (training) and evaluation transforms, with albumentations.

Inputs are the cached RGB uint8 images; outputs are normalised CHW float tensors. Mean and std come
from the backbone's timm data config (EfficientNetV2-S: 0.5/0.5), never hard-coded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation strengths (config `data.augment`). 0 disables a component.

    Attributes:
        crop_scale: RandomResizedCrop area range (min, max).
        hflip, vflip: flip probabilities (a fundus flipped is still a plausible fundus).
        rotate: max rotation in degrees (the camera's orientation varies; lesions do not care).
        brightness, contrast, saturation, hue: colour jitter amplitudes.
        clahe: CLAHE probability (contrast-limited histogram equalisation).
        blur: probability of a light Gaussian blur.
        noise: probability of light Gaussian noise.
    """

    crop_scale: tuple[float, float] = (0.85, 1.0)
    hflip: float = 0.5
    vflip: float = 0.5
    rotate: float = 180.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    clahe: float = 0.0
    blur: float = 0.1
    noise: float = 0.1


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def build_train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig
) -> A.Compose:
    """Random crop, flips, rotation, colour jitter, optional CLAHE/blur/noise, normalise."""
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(image_size, image_size),
            scale=tuple(augment.crop_scale),
            ratio=(0.9, 1.1),
            interpolation=cv2.INTER_LINEAR,  # a mild downscale: cheaper than INTER_AREA
        )
    ]
    if augment.hflip:
        steps.append(A.HorizontalFlip(p=augment.hflip))
    if augment.vflip:
        steps.append(A.VerticalFlip(p=augment.vflip))
    if augment.rotate:
        steps.append(
            A.Affine(
                rotate=(-augment.rotate, augment.rotate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.7,
            )
        )
    # Brightness/contrast by lookup table plus a separate HSV shift: the effect of ColorJitter
    # at a lower cost per image (bench/data_loading.py).
    if augment.brightness or augment.contrast:
        steps.append(A.RandomBrightnessContrast(augment.brightness, augment.contrast, p=0.8))
    if augment.saturation or augment.hue:
        steps.append(
            A.HueSaturationValue(
                hue_shift_limit=round(augment.hue * 180),
                sat_shift_limit=round(augment.saturation * 100),
                val_shift_limit=0,
                p=0.8,
            )
        )
    if augment.clahe:
        steps.append(A.CLAHE(clip_limit=2.0, p=augment.clahe))
    if augment.blur:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=augment.blur))
    if augment.noise:
        steps.append(A.GaussNoise(std_range=(0.01, 0.04), p=augment.noise))
    return A.Compose(steps + _normalize(mean, std))


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize + normalise: what validation, test, prediction and export all expect."""
    resize = A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)
    return A.Compose([resize, *_normalize(mean, std)])
