"""Messidor-2 with the adjudicated grades (Krause et al. 2018): DR 0-4, referable DME 0/1.

Layout under `data.root`:

- ``messidor_data.csv`` with columns ``image_id, adjudicated_dr_grade, adjudicated_dme,
  adjudicated_gradable``; ``image_id`` carries the file extension;
- ``IMAGES/`` (`image_dir`) with the 1,748 images, names mixing ``.png`` and upper-case
  ``.JPG`` (matched case-insensitively; a file converted to another extension is found by
  its stem).

Rows with ``adjudicated_gradable == 0`` or an empty DR grade carry no grade and are skipped (their
count is logged; `skipped` lists them). ``adjudicated_dme`` is *referable* DME (binary), not the
three-grade scale the DME head predicts, so records get ``dme = -1``; the binary label is kept in
`referable_dme` for screening-style evaluation. Messidor-2 has no official split: `load` returns
``train`` only and the datamodule holds out `data.test_fraction`. Keys are ``messidor2/<image_id>``.

Examinations: Messidor-2 photographs both eyes of each examination. With `pairs_table` (a CSV,
relative to root, one examination per row with its image names in the first two columns, comma-
or semicolon-separated, an optional header) the two images of a row get one patient id, so the
held-out test and validation splits keep them together. Without it each image is its own patient.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.tables import (
    is_blank,
    parse_grade,
    read_label_table,
    resolve_image,
    row_location,
)
from visioncare.errors import ConfigurationError, DataValidationError

log = logging.getLogger(__name__)

LABELS = "messidor_data.csv"
COLUMNS = {
    "image": "image_id",
    "dr": "adjudicated_dr_grade",
    "dme": "adjudicated_dme",
    "gradable": "adjudicated_gradable",
}


class Messidor2Source(DatasetSource):
    """Messidor-2: gradable images only, DR graded, referable DME kept aside.

    Args:
        root: the folder holding ``messidor_data.csv`` (`data.root`).
        image_dir: folder of the images, relative to root.
        pairs_table: CSV of examinations (two image names per row), relative to root; None =
            no patient grouping.

    Attributes:
        referable_dme: after `load()`, record key -> adjudicated referable DME (0/1) for every
            loaded record whose cell is not empty. Not in `Record.dme`: that field is the 0-2
            grade, and a binary label there would be read as grades 0/1.
        skipped: after `load()`, the ``image_id`` of every ungradable row left out.
    """

    name = "messidor2"

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "IMAGES",
        pairs_table: str | None = None,
    ) -> None:
        super().__init__(root)
        self.image_dir = image_dir
        self.pairs_table = pairs_table
        self.referable_dme: dict[str, int] = {}
        self.skipped: list[str] = []

    def load(self) -> dict[str, list[Record]]:
        self.require_root()
        labels = self.root / LABELS
        if not labels.is_file():
            raise DataValidationError(
                f"no Messidor-2 labels under data.root={str(self.root)!r}: expected '{LABELS}' "
                f"(the adjudicated grades) next to '{self.image_dir}/' (data.image_dir)"
            )
        table = read_label_table(labels, COLUMNS)
        patients = self._examinations()
        folder = self.root / self.image_dir
        listing = {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}
        lowered = {name.lower(): path for name, path in listing.items()}
        problems: list[str] = []
        records: list[Record] = []
        referable: dict[str, int] = {}
        skipped: list[str] = []
        for row in table.itertuples(index=False):
            where = row_location(labels, row.row, row.image)
            if is_blank(row.image):
                problems.append(f"{where}: empty image_id")
                continue
            gradable = parse_grade(row.gradable, 1, where, problems, COLUMNS["gradable"])
            if gradable == 0 or is_blank(row.dr):
                skipped.append(row.image)
                continue
            dr = parse_grade(row.dr, 4, where, problems, COLUMNS["dr"])
            dme = parse_grade(row.dme, 1, where, problems, COLUMNS["dme"])
            image = lowered.get(row.image.lower()) or resolve_image(
                folder, Path(row.image).stem, listing
            )
            if not image.is_file():
                image = folder / row.image  # report the name the table gives
            key = f"{self.name}/{row.image}"
            patient = patients.get(row.image.lower(), "")
            records.append(Record(image, dr, -1, self.name, key, patient))
            if dme != -1:
                referable[key] = dme
        if problems:
            raise DataValidationError.from_problems("Messidor-2 labels are invalid", problems)
        if skipped:
            log.info(
                "Messidor-2: skipped %d ungradable row(s) without a DR grade (of %d)",
                len(skipped),
                len(table),
            )
        self.referable_dme, self.skipped = referable, skipped
        return {"train": records}

    def _examinations(self) -> dict[str, str]:
        """Lower-cased image name -> examination id (its first image's name) from `pairs_table`."""
        if self.pairs_table is None:
            return {}
        path = Path(self.pairs_table).expanduser()
        path = path if path.is_absolute() else self.root / path
        if not path.is_file():
            raise ConfigurationError(
                f"data.pairs_table={self.pairs_table!r}: {path} not found (a relative path is "
                "read from data.root); set it to null to treat every image as its own patient"
            )
        text = path.read_text(encoding="utf-8-sig")
        delimiter = ";" if text.count(";") > text.count(",") else ","
        patients: dict[str, str] = {}
        for line, cells in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), 1):
            names = [c.strip() for c in cells[:2] if c.strip()]
            if len(names) < 2 or not all(Path(n).suffix for n in names):
                continue  # a header or a blank line
            first = Path(names[0]).name
            for name in names:
                patients[Path(name).name.lower()] = first
            log.debug("Messidor-2 examination %d: %s", line, names)
        return patients
