"""APTOS 2019 Blindness Detection (Kaggle): DR 0-4 only, 3,662 labelled images.

Layout under `data.root` (as unzipped from Kaggle):

- ``train.csv`` with columns ``id_code,diagnosis`` (diagnosis = ICDR grade 0-4);
- ``train_images/<id_code>.png``;
- ``test.csv`` / ``test_images/`` hold the competition's test set, whose labels were never
  published; they are ignored.

There is no DME grade (every record has ``dme = -1``). The labelled set has no official test
split, so `load` returns ``train`` only; the datamodule holds out the test split
(`data.test_fraction`, `data.test_split_seed`) and then validation. Keys are ``aptos/<id_code>``.
"""

from __future__ import annotations

from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.tables import read_dr_only_table
from visioncare.errors import DataValidationError

LABELS = "train.csv"
IMAGES = "train_images"
COLUMNS = {"image": "id_code", "dr": "diagnosis"}


class APTOSSource(DatasetSource):
    """APTOS 2019: labelled ``train.csv`` only (the test split is held out by the datamodule).

    Args:
        root: the folder holding ``train.csv`` and ``train_images/`` (`data.root`).
    """

    name = "aptos"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)

    def load(self) -> dict[str, list[Record]]:
        self.require_root()
        labels = self.root / LABELS
        if not labels.is_file():
            raise DataValidationError(
                f"no APTOS labels under data.root={str(self.root)!r}: expected '{LABELS}' "
                f"(columns id_code,diagnosis) next to '{IMAGES}/'. Point data.root at the "
                "unzipped aptos2019-blindness-detection folder."
            )
        problems: list[str] = []
        records = read_dr_only_table(
            labels, COLUMNS, self.root / IMAGES, self.name, "", ".png", problems
        )
        if problems:
            raise DataValidationError.from_problems("APTOS labels are invalid", problems)
        return {"train": records}
