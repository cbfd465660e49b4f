"""EyePACS / Kaggle Diabetic Retinopathy Detection (2015): DR 0-4 only, ~35k labelled images.

Layout under `data.root` (as unzipped from Kaggle):

- ``trainLabels.csv`` with columns ``image,level`` (level = ICDR grade 0-4); names such as
  ``10_left``/``10_right`` (one row per eye, no extension);
- ``train/<image>.jpeg`` (`image_dir`); copies that unpacked the images straight into
  `data.root` are accepted too when that folder is missing;
- optionally ``testLabels.csv`` (``image,level,Usage``; Kaggle released it after the
  competition, Usage = Public/Private) with ``test/<image>.jpeg`` (`test_image_dir`).

Each row is one eye of a patient: ``10_left`` and ``10_right`` get patient ``10`` and
laterality ``L``/``R``, so the test hold-out and the validation split keep a patient's eyes
together (the eyes' grades are strongly correlated). There is no DME grade (``dme = -1``).
When both ``testLabels.csv`` and the test image folder are present they form the test split
(keys ``eyepacs/test/<image>``); otherwise `load` returns ``train`` only and the datamodule holds
out `data.test_fraction` of it (keys ``eyepacs/<image>`` either way for training images, so a
held-out image keeps its key).
"""

from __future__ import annotations

import logging
from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.tables import read_dr_only_table
from visioncare.errors import DataValidationError

log = logging.getLogger(__name__)

TRAIN_LABELS = "trainLabels.csv"
TEST_LABELS = "testLabels.csv"
COLUMNS = {"image": "image", "dr": "level"}


class EyePACSSource(DatasetSource):
    """Kaggle DR 2015: the official test split when its labels are present, else train only.

    Args:
        root: the folder holding ``trainLabels.csv`` (`data.root`).
        image_dir: folder of the training images, relative to root (images directly under root
            are accepted when it is missing).
        test_image_dir: folder of the official test images, relative to root.
    """

    name = "eyepacs"

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "train",
        test_image_dir: str = "test",
    ) -> None:
        super().__init__(root)
        self.image_dir = image_dir
        self.test_image_dir = test_image_dir

    def load(self) -> dict[str, list[Record]]:
        self.require_root()
        labels = self.root / TRAIN_LABELS
        if not labels.is_file():
            raise DataValidationError(
                f"no EyePACS labels under data.root={str(self.root)!r}: expected "
                f"'{TRAIN_LABELS}' (columns image,level) and the images in "
                f"'{self.image_dir}/' (data.image_dir). Point data.root at the unzipped "
                "diabetic-retinopathy-detection folder."
            )
        folder = self.root / self.image_dir
        if not folder.is_dir():
            log.info("EyePACS: no '%s/' folder; looking for the images in %s", folder, self.root)
            folder = self.root
        problems: list[str] = []
        train = self._read(labels, folder, "", problems)
        test_labels, test_folder = self.root / TEST_LABELS, self.root / self.test_image_dir
        official = test_labels.is_file() and test_folder.is_dir()
        test = self._read(test_labels, test_folder, "test/", problems) if official else []
        if problems:
            raise DataValidationError.from_problems("EyePACS labels are invalid", problems)
        if official:
            return {"train": train, "test": test}
        if test_labels.is_file():
            log.warning(
                "EyePACS: %s exists but %s/ does not; holding out data.test_fraction of the "
                "training images as the test split instead",
                test_labels,
                test_folder,
            )
        return {"train": train}

    def _read(self, labels: Path, folder: Path, prefix: str, problems: list[str]) -> list[Record]:
        """Records of one label table; problems are collected, not raised."""
        return read_dr_only_table(
            labels, COLUMNS, folder, self.name, prefix, ".jpeg", problems, eyes_in_names=True
        )
