"""Benchmark: the fundus field's localisation and crop, per full-size (4288×2848) photo.

It runs once on every image of a dataset (cache build) and on every photo `predict.py` sees, so
its cost per IDRiD-sized JPEG matters. The photos are built here, at IDRiD's size and JPEG
quality 95: scikit-image's real `retina.jpg` upscaled to a 3300 px circle cut at the top and
bottom by the frame (IDRiD's look), and a synthetic fundus (`render_fundus`) shown as a
wide-field export (a circle larger than the frame, rounded corners) with a white bar beside it.

Rows, each the median over ``--rounds`` per photo, one OpenCV thread (as the cache uses):
- `locate_fundus` alone, then with `crop_to_field` (a 256 px crop), on the decoded full-size
  array (what the algorithm costs when the photo is decoded whole: PNG, TIFF, DICOM);
- `prepare()` from the JPEG file (reduced decoding, localisation, crop, quality flags): what a
  cache build or `predict.py` pays per photo;
- the full-size JPEG decode alone, for scale.
A report, not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from common import Row, machine_line, print_table, save_rows
from skimage import data

from visioncare.data.fundus import crop_to_field, locate_fundus
from visioncare.data.preprocess import PreprocessConfig, prepare, read_image
from visioncare.data.quality import QualityThresholds
from visioncare.data.synthetic import render_fundus

WIDTH, HEIGHT = 4288, 2848  # IDRiD's Kowa VX-10α


def idrid_like(width: int, height: int) -> np.ndarray:
    """The real retina photo as a circle 1.16× the frame's height, cut top and bottom."""
    side = int(height * 1.16)
    circle = cv2.resize(data.retina(), (side, side), interpolation=cv2.INTER_CUBIC)
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (side - height) // 2, (width - side) // 2
    frame[:, left : left + side] = circle[top : top + height]
    return frame


def wide_field(width: int, height: int) -> np.ndarray:
    """A synthetic circle 1.6× the field's height seen through a rounded rectangle, plus a bar."""
    field_w, field_h = int(width * 0.8), int(height * 0.9)
    side = int(field_h * 1.6)
    circle = cv2.resize(
        render_fundus(0, 0, 1024, np.random.default_rng(0)), (side, side), cv2.INTER_CUBIC
    )
    top, left = (side - field_h) // 2, (side - field_w) // 2
    field = circle[top : top + field_h, left : left + field_w].copy()
    mask = np.zeros((field_h, field_w), np.uint8)
    corner = field_h // 8
    cv2.rectangle(mask, (corner, 0), (field_w - corner, field_h), 1, -1)
    cv2.rectangle(mask, (0, corner), (field_w, field_h - corner), 1, -1)
    for x in (corner, field_w - corner):
        for y in (corner, field_h - corner):
            cv2.circle(mask, (x, y), corner, 1, -1)
    frame = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - field_h) // 2, (width - field_w) // 4
    frame[y0 : y0 + field_h, x0 : x0 + field_w] = field * mask[..., None]
    bar = x0 + field_w + width // 40
    frame[:, bar : bar + width // 30] = 250  # a white UI bar beside the field
    return frame


def write_photos(folder: Path, width: int, height: int) -> list[Path]:
    paths = []
    for name, build in (("idrid_like", idrid_like), ("wide_field", wide_field)):
        path = folder / f"{name}.jpg"
        bgr = cv2.cvtColor(build(width, height), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


def median_ms(rounds: int, work: Callable[..., object], *args: object) -> float:
    """Median wall time of ``work(*args)`` in ms, after one untimed warm-up call."""
    work(*args)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work(*args)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def locate_and_crop(image: np.ndarray) -> np.ndarray | None:
    field = locate_fundus(image)
    return None if field is None else crop_to_field(image, field, 256)


def measure(args: argparse.Namespace) -> list[Row]:
    cv2.setNumThreads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="visioncare-fundus-") as tmp:
        for path in write_photos(Path(tmp), args.width, args.height):
            image = read_image(path)
            field = locate_fundus(image)
            found = "field found" if field is not None else "NO FIELD FOUND"
            locate = median_ms(args.rounds, locate_fundus, image)
            crop = median_ms(args.rounds, locate_and_crop, image)
            config, thresholds = PreprocessConfig(size=256), QualityThresholds()
            full = median_ms(args.rounds, prepare, path, config, thresholds)
            decode = median_ms(args.rounds, read_image, path)
            label = f"{path.stem} {args.width}×{args.height}"
            rows += [
                Row(f"{label}: locate alone, full-size array", f"{locate:.0f} ms/photo ({found})"),
                Row(f"{label}: locate + crop, full-size array", f"{crop:.0f} ms/photo"),
                Row(f"{label}: prepare() from the JPEG", f"{full:.0f} ms/photo"),
                Row(f"{label}: full-size JPEG decode alone", f"{decode:.0f} ms/photo"),
            ]
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fundus localisation + crop per full-size photo (a report: always exits 0)."
    )
    parser.add_argument("--width", type=int, default=WIDTH, help=f"photo width px ({WIDTH})")
    parser.add_argument("--height", type=int, default=HEIGHT, help=f"photo height px ({HEIGHT})")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions (5)")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    if min(args.width, args.height, args.rounds) < 1:
        parser.error("sizes and rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"VisionCare fundus crop benchmark — {machine_line()}\n", flush=True)
    rows = measure(args)
    print_table(rows)
    save_rows(args.json, "Fundus crop", rows)
    return 0  # a report: never fails through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
