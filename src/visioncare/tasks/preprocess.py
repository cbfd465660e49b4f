"""What the network sees: `python src/preprocess.py input=<dir|glob|csv> output_dir=<dir>`.

For every photo: `<stem>.png`, the image as the model receives it (fundus located and cropped,
resized to the input size, before normalisation), and a row of `crops.csv` with the located
circle in the original photo's pixels and the quality flag; plus `contact_sheet.png`, all crops
on one page. The preprocessing is the checkpoint's when `ckpt_path` is given (a `.ckpt` or an
exported `model.onnx`), so a user checks their photos against the very model they will run.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig

from visioncare.data.image_files import collect_images
from visioncare.data.input_spec import InputSpec
from visioncare.data.preprocess import (
    Prepared,
    PreprocessConfig,
    UnreadableImageError,
    default_cache_size,
    prepare,
)
from visioncare.data.quality import QualityThresholds
from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.serving.loading import input_spec, load_model, onnx_input_spec
from visioncare.utils.progress import progress_bar

log = logging.getLogger("visioncare")

# The located field in the photo's pixels (`FundusField.as_dict`: circle, the four straight cuts
# clipped to the visible field, the corner rounding), the quality flag and the gradable verdict.
FIELD_COLUMNS = [
    "center_x",
    "center_y",
    "radius",
    "top",
    "bottom",
    "left",
    "right",
    "corner_radius",
]
CROPS_COLUMNS = ["image", "width", "height", *FIELD_COLUMNS, "quality", "gradable", "error"]
SHEET_TILE = 160  # px per photo on the contact sheet
SHEET_MAX = 100  # photos on the contact sheet (the first ones): a page, not a poster


@dataclass(frozen=True)
class Settings:
    """The preprocessing to show: cache crop (`preprocess`) then resize to `image_size`."""

    image_size: int
    preprocess: PreprocessConfig


def settings_from(cfg: DictConfig) -> Settings:
    """The checkpoint's preprocessing when `ckpt_path` is set, else the config's keys."""
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        path = Path(str(ckpt)).expanduser()
        spec: InputSpec
        if path.suffix.lower() == ".onnx":
            spec = onnx_input_spec(path)
        else:
            model, _ = load_model(path)
            spec = input_spec(model)
        return Settings(spec.image_size, spec.preprocess)
    image_size = check_int_at_least(cfg.image_size, "image_size")
    if cfg.cache_size is None:
        cache_size = default_cache_size(image_size)
    else:
        cache_size = check_int_at_least(cfg.cache_size, "cache_size")
    if cache_size < image_size:
        raise ConfigurationError(
            f"cache_size ({cache_size}) must be >= image_size ({image_size}), as in training; "
            "set cache_size=null to derive it"
        )
    return Settings(
        image_size,
        PreprocessConfig(cache_size, bool(cfg.crop_fundus), bool(cfg.ben_graham)),
    )


def output_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>.png` per photo; a stem seen before gets `_2`, `_3`... (folders may repeat names)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(f"{path.stem}.png" if count == 1 else f"{path.stem}_{count}.png")
    return names


def _network_view(prepared: Prepared, image_size: int) -> np.ndarray:
    """The cached crop resized as the eval transform does (`build_eval_transform`)."""
    return cv2.resize(prepared.image, (image_size, image_size), interpolation=cv2.INTER_AREA)


def _row(path: Path, prepared: Prepared | None, error: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CROPS_COLUMNS, "")
    row["image"] = str(path)
    row["error"] = error
    if prepared is not None:
        row.update(width=prepared.width, height=prepared.height, quality=prepared.quality)
        if prepared.gradable is not None:
            row["gradable"] = str(prepared.gradable).lower()
        if prepared.field is not None:
            field = prepared.field.as_dict()
            row.update({key: f"{field[key]:.1f}" for key in FIELD_COLUMNS})
    return row


def contact_sheet(tiles: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    """RGB tiles in a grid, each captioned (file name and quality) beneath."""
    columns = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / columns)
    caption_h = 34
    sheet = np.full((rows * (SHEET_TILE + caption_h), columns * SHEET_TILE, 3), 255, np.uint8)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        y, x = (i // columns) * (SHEET_TILE + caption_h), (i % columns) * SHEET_TILE
        sheet[y : y + SHEET_TILE, x : x + SHEET_TILE] = cv2.resize(
            tile, (SHEET_TILE, SHEET_TILE), interpolation=cv2.INTER_AREA
        )
        for k, line in enumerate(caption.split("\n")[:2]):
            cv2.putText(
                sheet, line[:24], (x + 4, y + SHEET_TILE + 14 + 15 * k),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA,
            )  # fmt: skip
    return sheet


def run(cfg: DictConfig) -> dict[str, Any]:
    """The `preprocess` task: photos → `<stem>.png`, `crops.csv`, `contact_sheet.png`."""
    settings = settings_from(cfg)
    thresholds = QualityThresholds.from_config(cfg.get("quality"))
    paths = collect_images(cfg.input)
    out_dir = Path(str(cfg.output_dir)).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)

    def one(path: Path) -> tuple[Prepared | None, str]:
        try:
            return prepare(path, settings.preprocess, thresholds), ""
        except (UnreadableImageError, OSError) as error:
            return None, str(error) or type(error).__name__

    rows, tiles, captions = [], [], []
    progress = progress_bar()
    workers = max(1, int(cfg.get("num_workers", 1)))
    with progress, ThreadPoolExecutor(max_workers=workers) as pool:
        bar = progress.add_task("Preprocessing", total=len(paths))
        for path, name, (prepared, error) in zip(paths, names, pool.map(one, paths), strict=True):
            rows.append(_row(path, prepared, error))
            if prepared is not None:
                view = _network_view(prepared, settings.image_size)
                cv2.imwrite(str(out_dir / name), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
            else:
                view = np.full((settings.image_size,) * 2 + (3,), 128, np.uint8)
            if len(tiles) < SHEET_MAX:
                tiles.append(view)
                captions.append(f"{path.name}\n{prepared.quality if prepared else 'ERROR'}")
            progress.advance(bar)
    crops = out_dir / "crops.csv"
    with crops.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CROPS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    sheet = out_dir / "contact_sheet.png"
    cv2.imwrite(str(sheet), cv2.cvtColor(contact_sheet(tiles, captions), cv2.COLOR_RGB2BGR))
    failed = sum(bool(r["error"]) for r in rows)
    doubtful = sum(r["quality"] not in ("", "ok") for r in rows)
    log.info(
        "%d photo(s): %d crop(s) written, %d unreadable, %d flagged (see crops.csv): %s",
        len(paths), len(paths) - failed, failed, doubtful, out_dir,
    )  # fmt: skip
    if len(paths) > SHEET_MAX:
        log.info("The contact sheet shows the first %d photos", SHEET_MAX)
    return {"output_dir": str(out_dir), "num_images": len(paths), "num_errors": failed}
