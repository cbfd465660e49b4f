"""IDRiD, sub-challenge 2 (Disease Grading): DR 0-4 and DME 0-2 for every image.

`data.root` may point at the folder that holds ``B. Disease Grading``, at that folder itself, or at
a copy with one more nested ``B. Disease Grading`` level. The CSVs' published quirks are honoured:
a header with or without a trailing space, trailing empty columns, CRLF line ends, stray spaces in
cells, a UTF-8 BOM, image names without extension (files may be ``.jpg`` or ``.JPG``). Test image
numbering restarts at 001, so record keys carry the split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.errors import DataValidationError

GRADING = "B. Disease Grading"
IMAGES = "1. Original Images"
LABELS = "2. Groundtruths"
SPLITS = {
    "train": ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv"),
    "test": ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv"),
}
COLUMNS = {"image": "Image name", "dr": "Retinopathy grade", "dme": "Risk of macular edema"}
IMAGE_SUFFIXES = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".tif", ".tiff")


def find_grading_dir(root: Path) -> Path:
    """The folder that holds ``1. Original Images`` and ``2. Groundtruths``."""
    for candidate in (root, root / GRADING, root / GRADING / GRADING):
        if (candidate / IMAGES).is_dir() and (candidate / LABELS).is_dir():
            return candidate
    raise DataValidationError(
        f"no IDRiD Disease Grading data under data.root={str(root)!r}: expected "
        f"'{GRADING}/{IMAGES}' and '{GRADING}/{LABELS}' (or those two folders directly). "
        "Point data.root at the unzipped 'B. Disease Grading' folder or its parent."
    )


def read_label_table(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """Read a label CSV leniently (BOM, CRLF, stray spaces, empty trailing columns).

    Returns a frame with columns ``image``, ``dr``, ``dme`` (strings), plus ``row`` = the line
    number in the file (header = line 1) for error messages.
    """
    if not path.is_file():
        raise DataValidationError(f"label file not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataValidationError(
            f"{path}: the file is empty; expected a header and rows"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: not a readable CSV ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    table = table.loc[:, [c for c in table.columns if c and not c.startswith("Unnamed:")]]
    wanted = {key: name.strip() for key, name in columns.items()}
    missing = [name for name in wanted.values() if name not in table.columns]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; expected {list(wanted.values())}, "
            f"found {list(table.columns)}"
        )
    table = table[list(wanted.values())].rename(columns={v: k for k, v in wanted.items()})
    table["row"] = range(2, len(table) + 2)
    table = table.dropna(how="all", subset=list(wanted))  # blank lines at the end
    for key in wanted:
        table[key] = table[key].str.strip()
    if table.empty:
        raise DataValidationError(f"{path}: the table has a header but no rows")
    return table


def parse_grade(value: object, max_grade: int, where: str, problems: list[str]) -> int:
    """An integer grade in 0..max_grade, or -1 for an empty cell; records a problem otherwise."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or str(value) == "":
        return -1
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        problems.append(f"{where}: grade {text!r} is not an integer")
        return -1
    if not number.is_integer() or not 0 <= number <= max_grade:
        problems.append(f"{where}: grade {text!r} is outside 0..{max_grade}")
        return -1
    return int(number)


def resolve_image(folder: Path, name: str, listing: dict[str, Path]) -> Path:
    """The image file for a name given with or without extension (any case); may not exist."""
    direct = folder / name
    if Path(name).suffix and direct.name in listing:
        return listing[direct.name]
    for suffix in IMAGE_SUFFIXES:
        if f"{name}{suffix}" in listing:
            return listing[f"{name}{suffix}"]
    lowered = {n.lower(): p for n, p in listing.items()}
    for suffix in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
        if f"{name}{suffix}".lower() in lowered:
            return lowered[f"{name}{suffix}".lower()]
    return direct if Path(name).suffix else folder / f"{name}.jpg"


class IDRiDSource(DatasetSource):
    """IDRiD Disease Grading: 413 train / 103 test images, both tasks graded."""

    name = "idrid"

    def load(self) -> dict[str, list[Record]]:
        self.require_root()
        grading = find_grading_dir(self.root)
        splits: dict[str, list[Record]] = {}
        problems: list[str] = []
        for split, (image_folder, csv_name) in SPLITS.items():
            folder = grading / IMAGES / image_folder
            table = read_label_table(grading / LABELS / csv_name, COLUMNS)
            listing = {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}
            records = []
            for row in table.itertuples(index=False):
                where = f"{grading / LABELS / csv_name}, row {row.row}"
                dr = parse_grade(row.dr, 4, where, problems)
                dme = parse_grade(row.dme, 2, where, problems)
                if not row.image:
                    problems.append(f"{where}: empty image name")
                    continue
                image = resolve_image(folder, row.image, listing)
                key = f"{self.name}/{split}/{Path(row.image).stem}"
                records.append(Record(image, dr, dme, self.name, key))
            splits[split] = records
        if problems:
            raise DataValidationError.from_problems("IDRiD labels are invalid", problems)
        return splits
