"""Fundus preprocessing: decode (any image OpenCV reads, or DICOM), locate the fundus field,
crop to it, optional Ben Graham, resize.

Run once per image when the cache is built (`visioncare.data.cache`), never per epoch; `eval.py`,
`predict.py`, `preprocess.py` and exported models (`preprocessing.json`) use the same `prepare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from visioncare.data.dicom import DicomError, is_dicom, read_dicom
from visioncare.data.fundus import (
    LOCALISATION_VERSION,
    FundusField,
    crop_to_field,
    crop_window,
    locate_fundus,
    pad_to_square,
)
from visioncare.data.quality import OK, QualityThresholds, assess, is_gradable

# Parallelism is across images (cache threads, DataLoader workers), never inside one image:
# OpenCV's own thread pool would oversubscribe small machines, and a pool started in the parent
# can deadlock the DataLoader workers forked from it.
cv2.setNumThreads(1)

REDUCED_FLAGS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


# Every format `read_image` decodes: folders and globs pick these files up.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm", ".dcm", ".dicom",
)  # fmt: skip

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
JPEG_TAIL = 4096  # some cameras append metadata after the end-of-image marker
DICOM_HEAD = 132  # preamble + "DICM"


class UnreadableImageError(ValueError):
    """The file is missing, empty, truncated, a DICOM without an image, or not decodable."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that define the cached image; any change gives a new cache.

    Attributes:
        size: side of the square cached image in pixels (a little above the training size, so
            random crops keep detail).
        crop_fundus: locate the fundus field (`visioncare.data.fundus`), centre the visible
            field in the square (filling it along its longer axis) and black out everything
            outside it; false = the whole photo, padded.
        ben_graham: subtract the local mean colour (4·img − 4·GaussianBlur(img, σ=size/30) + 128).

    `as_dict` adds the localisation algorithm's version: it keys the cache (a changed algorithm
    never reuses old crops) and travels in an export's `preprocessing.json`.
    """

    size: int = 256
    crop_fundus: bool = True
    ben_graham: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "localisation": LOCALISATION_VERSION}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        """The inverse of `as_dict`; keys of older versions (``threshold``) are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def default_cache_size(image_size: int) -> int:
    """The cached side for a network input of ``image_size``: 1/8 above it, rounded up to 16 px.

    The margin lets training's random resized crops keep detail; 224 → 256 and 128 → 144.
    Used when `data.cache_size` is null, so changing `data.image_size` alone is enough.
    """
    return -(-(image_size * 9) // 128) * 16  # ceil(image_size * 9/8 / 16) * 16


@dataclass(frozen=True)
class Prepared:
    """One photo as the network's cache holds it, with what was found on the way.

    Attributes:
        image: RGB uint8 (size, size, 3).
        width, height: the photo's size in its own pixels.
        field: the located fundus field in the photo's pixels (None: not found, or not looked
            for: no crop and no quality flag asked).
        quality: `ok` or the reasons the photo is doubtful (`visioncare.data.quality`).
        gradable: whether a grade from this photo can be trusted
            (`visioncare.data.quality.is_gradable`: field found, no untrustworthy flag); None
            when the quality was not judged (`prepare` without thresholds, e.g. the cache).
    """

    image: np.ndarray
    width: int
    height: int
    field: FundusField | None
    quality: str
    gradable: bool | None = None


def _reduced_flag(path: Path, target: int) -> tuple[int, tuple[int, int] | None]:
    """The largest JPEG reduced-decoding factor that still leaves >= target pixels per side,
    and the photo's full (width, height) when the header was read."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return cv2.IMREAD_COLOR, None
    try:
        from PIL import Image

        with Image.open(path) as image:
            size = image.size
    except Exception:  # unknown header: decode at full size and let OpenCV judge it
        return cv2.IMREAD_COLOR, None
    for factor, flag in REDUCED_FLAGS:
        # The fundus disc fills most of the short side; keep 10 % margin before the crop.
        if min(size) / factor >= target * 1.1:
            return flag, size
    return cv2.IMREAD_COLOR, size


def read_image(path: str | Path, target: int | None = None) -> np.ndarray:
    """Decode any image OpenCV reads, or a DICOM file, into RGB uint8 (H, W, 3).

    Grayscale, RGBA and 16-bit images are converted; the format comes from the bytes, not the
    suffix (a PNG named .jpg works). ``target`` enables JPEG reduced decoding.
    """
    return decode(path, target)[0]


def decode(path: str | Path, target: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`read_image`'s RGB array and the photo's full (width, height) in its own pixels.

    The two differ when ``target`` lets a large JPEG be decoded at 1/2, 1/4 or 1/8 scale.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UnreadableImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise UnreadableImageError(f"{path} is empty (0 bytes)")
    if is_dicom(path, data[:DICOM_HEAD].tobytes()):
        try:
            image = read_dicom(path)
        except DicomError as error:
            raise UnreadableImageError(str(error)) from None
        return image, (image.shape[1], image.shape[0])
    if data[:2].tobytes() == JPEG_START and JPEG_END not in data[-JPEG_TAIL:].tobytes():
        # OpenCV 4.x decodes a cut-off JPEG without error (garbage below the cut); refuse it.
        raise UnreadableImageError(f"{path} is a truncated JPEG (no end marker); re-download it")
    flag, size = _reduced_flag(path, target) if target else (cv2.IMREAD_COLOR, None)
    image = cv2.imdecode(data, flag)
    if image is None and flag != cv2.IMREAD_COLOR:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        image = _decode_unusual(data)
    if image is None or image.size == 0:
        raise UnreadableImageError(f"{path} is not a decodable image (corrupt or truncated?)")
    full_size = size or (image.shape[1], image.shape[0])
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), full_size


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


def ben_graham(image: np.ndarray) -> np.ndarray:
    """Local-mean subtraction (Graham, Kaggle DR 2015): evens illumination, boosts lesions."""
    sigma = image.shape[0] / 30
    blurred = cv2.GaussianBlur(image, (0, 0), sigma)
    return cv2.addWeighted(image, 4, blurred, -4, 128)


def prepare(
    path: str | Path,
    config: PreprocessConfig,
    thresholds: QualityThresholds | None = None,
) -> Prepared:
    """Decode → locate the field → crop → (Ben Graham) → resize, plus the quality flag.

    A photo whose field cannot be found is not cropped blindly: it is padded whole to a square
    (what `crop_fundus=false` does) and flagged `no_fundus_found`; the caller decides.
    ``thresholds`` None skips the quality measures (the cache does not store them).
    """
    image, (width, height) = decode(path, target=config.size)
    scale = width / image.shape[1]
    # Located for the quality flag too, so crop_fundus=false photos are still judged.
    wanted = config.crop_fundus or thresholds is not None
    field = locate_fundus(image) if wanted else None
    if field is not None and scale > 1 and crop_window(field)[2] < config.size:
        # Reduced decoding assumed the field fills the frame; a small one needs every pixel.
        image, _ = decode(path)
        scale = 1.0
        field = locate_fundus(image)
    if field is not None and config.crop_fundus:
        out = crop_to_field(image, field, config.size)
    else:
        out = pad_to_square(image, config.size)
    if config.ben_graham:
        out = ben_graham(out)
    quality, gradable = OK, None
    if thresholds is not None:
        quality = assess(image, field, thresholds, min_diameter=config.size, scale=scale)
        gradable = is_gradable(quality)
    return Prepared(
        image=out,
        width=width,
        height=height,
        field=None if field is None else field.scaled(scale),
        quality=quality,
        gradable=gradable,
    )


def preprocess(path: str | Path, config: PreprocessConfig) -> np.ndarray:
    """The cached image of ``path``: RGB uint8 (size, size, 3) (see `prepare`)."""
    return prepare(path, config).image


def gradable_flags(
    paths: Sequence[str | Path],
    config: PreprocessConfig,
    thresholds: QualityThresholds,
    num_workers: int = 1,
) -> list[bool]:
    """Whether each photo's grade can be trusted (`quality.is_gradable`), as `predict.py` judges.

    The cache stores pixels only, so an evaluation that reports its gradable subset measures
    the photos again here, with the same `prepare` (a file that cannot be read is not gradable).
    """

    def one(path: str | Path) -> bool:
        try:
            return bool(prepare(path, config, thresholds).gradable)
        except (UnreadableImageError, OSError):
            return False

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:  # OpenCV frees the GIL
        return list(pool.map(one, paths))
