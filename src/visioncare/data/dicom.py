"""Read the photograph out of a DICOM file (what clinics' fundus cameras export) with pydicom.

Ophthalmic Photography files (SOP classes 1.2.840.10008.5.1.4.1.1.77.1.5.1 / .2) hold an RGB
image, uncompressed or JPEG-compressed (then `YBR_FULL_422`), 8 or 16 bits per sample; some
hold several frames. pydicom converts YBR to RGB and decodes the compressed transfer syntaxes
it has a handler for (JPEG baseline through Pillow; JPEG-LS, JPEG 2000 and lossless JPEG with
`pylibjpeg` plugins or `python-gdcm` installed). Only the first frame is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The camera of a photograph, for subgroup reports (eval) and predict's `camera` column.
CAMERA_TAGS = ("Manufacturer", "ManufacturerModelName")


class DicomError(ValueError):
    """The DICOM file holds no image, or one pydicom cannot decode here."""


def is_dicom(path: Path, head: bytes) -> bool:
    """A DICOM file by its preamble magic, or by suffix (files written without a preamble)."""
    magic = head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)]
    return magic == DICOM_MAGIC or path.suffix.lower() in (".dcm", ".dicom")


class DicomIdentity(NamedTuple):
    """What a DICOM header says about a photograph; "" where a tag is absent."""

    patient: str
    laterality: str  # L or R
    camera: str  # Manufacturer and ManufacturerModelName, space-joined


def dicom_identity(path: Path) -> DicomIdentity:
    """PatientID, ImageLaterality (``L``/``R``) and the camera from a DICOM header.

    Reads the header only (no pixel data), so a dataset of 20 MB camera exports is identified in
    milliseconds per file. Anything unreadable gives empty fields: decoding errors are reported
    by the image check, not here.
    """
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # unreadable headers are the image check's to report
        return DicomIdentity("", "", "")
    patient = str(dataset.get("PatientID", "") or "").strip()
    side = str(dataset.get("ImageLaterality", "") or dataset.get("Laterality", "") or "")
    side = side.strip().upper()
    return DicomIdentity(patient, side if side in ("L", "R") else "", dicom_camera(dataset))


def dicom_camera(dataset: object) -> str:
    """``Manufacturer ManufacturerModelName`` of a read header (either may be absent)."""
    parts = (str(getattr(dataset, tag, "") or "").strip() for tag in CAMERA_TAGS)
    return " ".join(p for p in parts if p)


def read_dicom(path: Path) -> np.ndarray:
    """The first frame of a DICOM file as RGB uint8 (H, W, 3).

    Raises:
        DicomError: naming the file and what to do (no pixel data, no decoder, not DICOM).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        dataset = pydicom.dcmread(path, defer_size="1 KB", force=path.suffix.lower() == ".dcm")
    except (InvalidDicomError, EOFError, OSError, ValueError) as error:
        raise DicomError(f"{path} is not a readable DICOM file ({error})") from None
    if not any(tag in dataset for tag in PIXEL_TAGS):
        sop = dataset.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None else ""
        raise DicomError(
            f"{path} is a DICOM file without pixel data{kind}: it holds no photograph. Export "
            "the image itself from the camera software (Ophthalmic Photography / Secondary "
            "Capture), or remove the file"
        )
    try:
        frame = pixel_array(dataset, index=0)
    except Exception as error:  # pydicom raises several types for missing/failed handlers
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise DicomError(
            f"{path}: pydicom cannot decode its pixel data ({name}): {error}. For compressed "
            "DICOM install a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "RGB")).upper()
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, dataset)
    frame = _to_uint8(frame, int(dataset.get("BitsStored", 8)), frame.dtype)
    if frame.ndim == 2:
        if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
            frame = 255 - frame
        frame = np.repeat(frame[..., None], 3, axis=2)
    return np.ascontiguousarray(frame[..., :3])


def _to_uint8(frame: np.ndarray, bits_stored: int, dtype: np.dtype) -> np.ndarray:
    """Scale integer samples of ``bits_stored`` bits (or floats in 0..1) to 0..255."""
    if dtype == np.uint8:
        return frame
    if np.issubdtype(dtype, np.floating):
        top = 1.0 if float(frame.max()) <= 1.0 else float(frame.max())
    else:
        top = float(2 ** min(bits_stored, 8 * np.dtype(dtype).itemsize) - 1)
    scaled = np.clip(frame.astype(np.float32) * (255.0 / max(top, 1.0)), 0, 255)
    return np.rint(scaled).astype(np.uint8)
