"""The images a user points a command at: a folder, a glob pattern or a CSV with an `image` column.

Shared by `predict.py` and `preprocess.py`, so both pick up the same files (DICOM included).
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path

from visioncare.data.preprocess import IMAGE_EXTENSIONS
from visioncare.errors import ConfigurationError


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(source: str | Path) -> list[Path]:
    """Image paths from a folder (recursive), a glob pattern or a CSV with an `image` column.

    CSV paths that are relative are resolved against the CSV's folder, so a CSV travels with its
    images. CSV rows are kept as listed (a missing file there gets an error row, not silence);
    folders and globs keep image files only (`IMAGE_EXTENSIONS`, DICOM included), sorted for a
    reproducible output order.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if _is_image(p))
    elif path.is_file() and path.suffix.lower() == ".csv":
        images = _images_from_csv(path)
    elif path.is_file():
        images = [path]
    else:
        images = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
    if not images:
        raise ConfigurationError(
            f"input={text!r} matches no image file ({', '.join(IMAGE_EXTENSIONS)}); give a folder, "
            "a glob such as 'photos/*.jpg' (quoted) or a CSV with an 'image' column"
        )
    return images


def _images_from_csv(path: Path) -> list[Path]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "image" not in (reader.fieldnames or []):
            raise ConfigurationError(
                f"input={str(path)!r}: the CSV has no 'image' column (columns: {reader.fieldnames})"
            )
        names = [row["image"].strip() for row in reader if (row.get("image") or "").strip()]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, names)]
