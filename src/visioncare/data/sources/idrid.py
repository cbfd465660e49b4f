"""IDRiD, sub-challenge 2 (Disease Grading): DR 0-4 and DME 0-2 for every image.

`data.root` may point at the folder that holds ``B. Disease Grading``, at that folder itself, or at
a copy with one more nested ``B. Disease Grading`` level. The CSVs' published quirks are honoured:
a header with or without a trailing space, trailing empty columns, CRLF line ends, stray spaces in
cells, a UTF-8 BOM, image names without extension (files may be ``.jpg`` or ``.JPG``). Test image
numbering restarts at 001, so record keys carry the split.
"""

from __future__ import annotations

from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.idrid_layout import COLUMNS, GRADING, IMAGES, LABELS, SPLITS
from visioncare.data.sources.tables import (
    parse_grade,
    read_label_table,
    resolve_image,
    row_location,
)
from visioncare.errors import DataValidationError


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
                where = row_location(grading / LABELS / csv_name, row.row, row.image)
                dr = parse_grade(row.dr, 4, where, problems, COLUMNS["dr"])
                dme = parse_grade(row.dme, 2, where, problems, COLUMNS["dme"])
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
