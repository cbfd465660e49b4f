"""APTOS 2019 Blindness Detection (Kaggle): DR 0-4 only, 3,662 labelled images.

Layout under `data.root` (as unzipped from Kaggle):

- ``train.csv`` with columns ``id_code,diagnosis`` (diagnosis = ICDR grade 0-4);
- ``train_images/<id_code>.png``;
- ``test.csv`` / ``test_images/`` hold the competition's test set, whose labels were never
  published; they are ignored.

There is no DME grade (every record has ``dme = -1``). Because the labelled set has no official
test split, a seeded stratified share of it (`test_fraction`, seed `split_seed`) is held out as
``test``; the validation split is then carved out of the rest by the datamodule. Keys are
``aptos/<id_code>``.

The helpers here (`hold_out_test`, `check_test_fraction`, `is_blank`) are shared by the other
sources without an official labelled test split (EyePACS, Messidor-2, CSV table).
"""

from __future__ import annotations

from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.tables import (
    check_test_fraction,
    hold_out_test,
    read_dr_only_table,
)
from visioncare.errors import DataValidationError

LABELS = "train.csv"
IMAGES = "train_images"
COLUMNS = {"image": "id_code", "dr": "diagnosis"}


class APTOSSource(DatasetSource):
    """APTOS 2019: labelled ``train.csv`` only, with a held-out test split.

    Args:
        root: the folder holding ``train.csv`` and ``train_images/`` (`data.root`).
        test_fraction: share of the labelled images held out as the test split.
        split_seed: seed of that hold-out (`data.source.split_seed`; independent of the
            validation seed `data.split_seed`, so reshuffling validation keeps the test set).
    """

    name = "aptos"

    def __init__(self, root: str | Path, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        super().__init__(root)
        self.test_fraction = check_test_fraction(test_fraction)
        self.split_seed = split_seed

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
        return hold_out_test(records, self.test_fraction, self.split_seed)
