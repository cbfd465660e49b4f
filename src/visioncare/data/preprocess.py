"""Fundus preprocessing with OpenCV: decode, crop to the fundus field, optional Ben Graham, resize.

Run once per image when the cache is built (`visioncare.data.cache`), never per epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

# Parallelism is across images (cache threads, DataLoader workers), never inside one image:
# OpenCV's own thread pool would oversubscribe small machines, and a pool started in the parent
# can deadlock the DataLoader workers forked from it.
cv2.setNumThreads(1)

REDUCED_FLAGS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
JPEG_TAIL = 4096  # some cameras append metadata after the end-of-image marker


class UnreadableImageError(ValueError):
    """The file is missing, empty, truncated or not an image OpenCV can decode."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that define the cached image; any change gives a new cache.

    Attributes:
        size: side of the square cached image in pixels (a little above the training size, so
            random crops keep detail).
        crop_fundus: crop to the fundus disc's bounding box, dropping black borders.
        ben_graham: subtract the local mean colour (4·img − 4·GaussianBlur(img, σ=size/30) + 128).
        threshold: intensity (0-255) above which a pixel belongs to the fundus field.
    """

    size: int = 256
    crop_fundus: bool = True
    ben_graham: bool = False
    threshold: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


def default_cache_size(image_size: int) -> int:
    """The cached side for a network input of ``image_size``: 1/8 above it, rounded up to 16 px.

    The margin lets training's random resized crops keep detail; 224 → 256 and 128 → 144.
    Used when `data.cache_size` is null, so changing `data.image_size` alone is enough.
    """
    return -(-(image_size * 9) // 128) * 16  # ceil(image_size * 9/8 / 16) * 16


def _reduced_flag(path: Path, target: int) -> int:
    """The largest JPEG reduced-decoding factor that still leaves >= target pixels per side."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return cv2.IMREAD_COLOR
    try:
        from PIL import Image

        with Image.open(path) as image:
            short_side = min(image.size)
    except Exception:  # unknown header: decode at full size and let OpenCV judge it
        return cv2.IMREAD_COLOR
    for factor, flag in REDUCED_FLAGS:
        # The fundus disc fills most of the short side; keep 10 % margin before the crop.
        if short_side / factor >= target * 1.1:
            return flag
    return cv2.IMREAD_COLOR


def read_image(path: str | Path, target: int | None = None) -> np.ndarray:
    """Decode any image OpenCV reads into RGB uint8 (H, W, 3).

    Grayscale, RGBA and 16-bit images are converted; the format comes from the bytes, not the
    suffix (a PNG named .jpg works). ``target`` enables JPEG reduced decoding.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UnreadableImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise UnreadableImageError(f"{path} is empty (0 bytes)")
    if data[:2].tobytes() == JPEG_START and JPEG_END not in data[-JPEG_TAIL:].tobytes():
        # OpenCV 4.x decodes a cut-off JPEG without error (garbage below the cut); refuse it.
        raise UnreadableImageError(f"{path} is a truncated JPEG (no end marker); re-download it")
    flag = _reduced_flag(path, target) if target else cv2.IMREAD_COLOR
    image = cv2.imdecode(data, flag)
    if image is None and flag != cv2.IMREAD_COLOR:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        image = _decode_unusual(data)
    if image is None or image.size == 0:
        raise UnreadableImageError(f"{path} is not a decodable image (corrupt or truncated?)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_unusual(data: np.ndarray) -> np.ndarray | None:
    """Fallback for images IMREAD_COLOR rejects: decode unchanged, then convert to 8-bit BGR."""
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    if image.dtype != np.uint8:
        scale = 255.0 / max(float(image.max()), 1.0)
        image = np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def crop_to_fundus(image: np.ndarray, threshold: int = 10) -> np.ndarray:
    """Crop to the bounding box of the bright fundus field and pad to a centred square."""
    gray = image.max(axis=2)
    mask = gray > threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size < 8 or cols.size < 8:  # (almost) black image: nothing to crop to
        cropped = image
    else:
        cropped = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = cropped.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(
        cropped, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
    )


def ben_graham(image: np.ndarray) -> np.ndarray:
    """Local-mean subtraction (Graham, Kaggle DR 2015): evens illumination, boosts lesions."""
    sigma = image.shape[0] / 30
    blurred = cv2.GaussianBlur(image, (0, 0), sigma)
    return cv2.addWeighted(image, 4, blurred, -4, 128)


def preprocess(path: str | Path, config: PreprocessConfig) -> np.ndarray:
    """Decode → crop → (Ben Graham) → resize to the cache size; RGB uint8 (size, size, 3)."""
    image = read_image(path, target=config.size)
    if config.crop_fundus:
        image = crop_to_fundus(image, config.threshold)
    else:
        image = crop_to_fundus(image, threshold=-1)  # pad to square only
    interpolation = cv2.INTER_AREA if image.shape[0] > config.size else cv2.INTER_CUBIC
    image = cv2.resize(image, (config.size, config.size), interpolation=interpolation)
    if config.ben_graham:
        image = ben_graham(image)
    return image
