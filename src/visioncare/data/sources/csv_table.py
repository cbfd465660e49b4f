"""Any labelled table of fundus images: one CSV row per image, column names set in the config.

Layout: images under `data.root` (a cell may hold a name, a relative path below root, or an
absolute path) and one CSV (`data.table`, absolute or relative to root) with

- an image column (`image_column`); names without an image extension get `image_suffix`, or are
  looked up with the usual extensions (any case);
- a DR column and/or a DME column (`dr_column`, `dme_column`; either may be null = that task is
  not graded). Cells hold integer grades, or free text translated by `dr_map`/`dme_map`
  (e.g. ``{none: 0, mild: 1}``, matched after stripping, case-insensitively; a map value of -1
  marks text that means "not graded"). An empty cell is "not graded" (-1); a row with neither
  grade is an error;
- optionally a split column (`split_column`) with ``train``/``val``/``test`` (also ``training``,
  ``valid``, ``validation``, ``testing``; any case). Without it every row is ``train`` and the
  datamodule holds out `data.test_fraction` as ``test``;
- optionally a patient column (`patient_column`): rows with the same id are one person's
  images, kept on one side of every split (a table whose own split column separates a patient's
  images is an error); and a laterality column (`laterality_column`: ``L``/``R``, ``left``/
  ``right``, ``OS``/``OD``, any case; empty = unknown);
- optionally subgroup columns (`group_columns`, e.g. ``[site, camera_model]``): carried into
  every record (`Record.groups`; an empty cell is ``unknown``), so eval reports metrics per value
  and predictions.csv lists them. A named column the table lacks is an error before any row is
  read.

Every bad cell is reported at once, with the file and line. Keys are ``<name>/<image cell>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pandas import read_csv

from visioncare.data.preprocess import IMAGE_EXTENSIONS as READABLE_EXTENSIONS
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

IMAGE_EXTENSIONS = set(READABLE_EXTENSIONS)
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
MAX_GRADE = {"dr": 4, "dme": 2}
LATERALITY = {"l": "L", "left": "L", "os": "L", "r": "R", "right": "R", "od": "R"}
# Groupings eval builds itself (or `dataset`, predictions.csv's own column); a data column may
# not take their names.
RESERVED_GROUPS = ("source", "laterality", "gradable", "camera", "dataset")

Listing = tuple[dict[str, Path], dict[str, Path]]


def normalize_map(mapping: Mapping[Any, Any] | None, task: str) -> dict[str, int] | None:
    """Lower-cased, stripped cell text -> grade; a bad map fails before any row is read."""
    if mapping is None:
        return None
    normalized: dict[str, int] = {}
    for text, grade in mapping.items():
        if isinstance(grade, bool) or not isinstance(grade, int):
            raise ConfigurationError(
                f"data.{task}_map[{text!r}] must be an integer grade, got {grade!r}"
            )
        if not -1 <= grade <= MAX_GRADE[task]:
            raise ConfigurationError(
                f"data.{task}_map[{text!r}] = {grade} is outside 0..{MAX_GRADE[task]} "
                "(or -1 = not graded)"
            )
        normalized[str(text).strip().lower()] = grade
    return normalized


def parse_group_columns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`data.group_columns` as a tuple of column names: a list, or one string (comma-separated
    names allowed, as typed on a command line); None or empty = no subgroups.

    Names are stripped; an empty name, a repeat, a ``/`` or ``=`` (they delimit metric keys
    ``test/group/<column>=<value>/...``) or a grouping eval builds itself is an error.
    """
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return ()
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(
                f"data.group_columns={value!r}: every entry must be a non-empty column name"
            )
        name = name.strip()
        if "/" in name or "=" in name:
            raise ConfigurationError(
                f"data.group_columns: {name!r} contains '/' or '=', which delimit metric keys; "
                "rename the column"
            )
        if name in RESERVED_GROUPS:
            raise ConfigurationError(
                f"data.group_columns: {name!r} is a grouping eval builds itself "
                f"({', '.join(RESERVED_GROUPS)}); rename the column"
            )
        if name in out:
            raise ConfigurationError(f"data.group_columns names {name!r} twice")
        out.append(name)
    return tuple(out)


class CSVTableSource(DatasetSource):
    """A dataset described by one CSV: column names, label vocabularies and splits configurable.

    Args:
        root: the folder holding the images (`data.root`).
        table: the CSV file, absolute or relative to root.
        image_column: column with the image name or path.
        dr_column: column with the DR grade; None when the table has no DR labels.
        dme_column: column with the DME grade; None when the table has no DME labels.
        dr_map: cell text -> DR grade (0-4, or -1 = not graded); None = cells are integers.
        dme_map: cell text -> DME grade (0-2, or -1 = not graded); None = cells are integers.
        split_column: column with train/val/test per row; None = all rows are ``train``.
        patient_column: column with the patient id; None = each image is its own patient.
        laterality_column: column with the eye (L/R); None = unknown.
        image_suffix: appended to names without an image extension (e.g. ``.png``).
        name: dataset name used in record keys and per-source metrics.
        group_columns: columns carried into records as subgroups (`parse_group_columns`).
    """

    def __init__(
        self,
        root: str | Path,
        table: str,
        image_column: str = "image",
        dr_column: str | None = "dr",
        dme_column: str | None = "dme",
        dr_map: Mapping[Any, Any] | None = None,
        dme_map: Mapping[Any, Any] | None = None,
        split_column: str | None = None,
        patient_column: str | None = None,
        laterality_column: str | None = None,
        image_suffix: str = "",
        name: str = "csv",
        group_columns: str | Sequence[str] | None = (),
    ) -> None:
        super().__init__(root)
        if not name or "/" in name:
            raise ConfigurationError(f"data.name must be non-empty and without '/', got {name!r}")
        if dr_column is None and dme_column is None:
            raise ConfigurationError(
                "data.dr_column and data.dme_column are both null: the table must grade something"
            )
        for task, column, mapping in (("dr", dr_column, dr_map), ("dme", dme_column, dme_map)):
            if mapping is not None and column is None:
                raise ConfigurationError(f"data.{task}_map is set but data.{task}_column is null")
        self.name = name
        self.table = table
        self.columns = {
            key: column
            for key, column in (
                ("image", image_column),
                ("dr", dr_column),
                ("dme", dme_column),
                ("split", split_column),
                ("patient", patient_column),
                ("laterality", laterality_column),
            )
            if column is not None
        }
        if len(set(self.columns.values())) < len(self.columns):
            raise ConfigurationError(f"data.*_column name the same column twice: {self.columns}")
        self.group_columns = parse_group_columns(group_columns)
        taken = sorted(set(self.group_columns) & set(self.columns.values()))
        if taken:
            raise ConfigurationError(
                f"data.group_columns names {taken}, already read as a data.*_column; "
                "laterality and source are subgroups already"
            )
        self.maps = {"dr": normalize_map(dr_map, "dr"), "dme": normalize_map(dme_map, "dme")}
        suffix = image_suffix.strip()
        self.image_suffix = f".{suffix}" if suffix and not suffix.startswith(".") else suffix
        # Checked when the config is instantiated (a header read), so a misspelt group column
        # stops eval or training before any image is read; `load` checks again.
        if self.group_columns and self.table_path.is_file():
            self._check_group_columns(self.table_path)

    @property
    def table_path(self) -> Path:
        path = Path(self.table).expanduser()
        return path if path.is_absolute() else self.root / path

    def load(self) -> dict[str, list[Record]]:
        self.require_root()
        path = self.table_path
        if not path.is_file():
            raise DataValidationError(
                f"data.table={self.table!r}: {path} not found "
                "(a relative path is read from data.root)"
            )
        self._check_group_columns(path)
        columns = {**self.columns, **{f"group{i}": c for i, c in enumerate(self.group_columns)}}
        try:
            frame = read_label_table(path, columns)
        except DataValidationError as exc:
            if "missing column" not in str(exc):
                raise
            raise DataValidationError(
                f"{exc}. Set data.image_column, data.dr_column, data.dme_column"
                + (", data.split_column" if "split" in self.columns else "")
                + " to the table's header names (null for a task it does not grade)."
            ) from None
        problems: list[str] = []
        listings: dict[Path, Listing] = {}
        splits: dict[str, list[Record]] = {"train": [], "test": []}
        first_split: dict[str, tuple[str, int]] = {}  # patient -> (split, row) first seen
        for row in frame.itertuples(index=False):
            where = row_location(path, row.row, row.image)
            before = len(problems)
            cells = row._asdict()
            if is_blank(row.image):
                problems.append(f"{where}: empty {self.columns['image']!r} cell")
                continue
            dr = self._grade(cells.get("dr"), "dr", where, problems)
            dme = self._grade(cells.get("dme"), "dme", where, problems)
            if dr == -1 and dme == -1 and len(problems) == before:
                problems.append(f"{where}: neither a DR nor a DME grade")
            split = self._split(cells["split"], where, problems) if "split" in cells else None
            patient = "" if is_blank(cells.get("patient")) else str(cells["patient"]).strip()
            laterality = self._laterality(cells.get("laterality"), where, problems)
            if len(problems) > before:
                continue
            if patient and split is not None:
                first, first_row = first_split.setdefault(patient, (split, row.row))
                if first != split:
                    problems.append(
                        f"{where}: patient {patient!r} is in {split!r} here and in {first!r} "
                        f"at line {first_row}; a patient's images must share one split "
                        f"(column {self.columns['split']!r}), or validation and test see the "
                        "other eye of a training patient"
                    )
            image = self._resolve(row.image, listings)
            key = f"{self.name}/{row.image}"
            groups = tuple(
                (column, "unknown" if is_blank(value) else str(value).strip())
                for column, value in zip(
                    self.group_columns,
                    (cells[f"group{i}"] for i in range(len(self.group_columns))),
                    strict=True,
                )
            )
            record = Record(image, dr, dme, self.name, key, patient, laterality, groups)
            splits.setdefault(split or "train", []).append(record)
        if "split" in self.columns and not splits["test"] and not problems:
            problems.append(
                f"{path}: no row has {self.columns['split']!r} = test; every dataset needs a "
                "test split (or set data.split_column=null to hold one out)"
            )
        if problems:
            raise DataValidationError.from_problems(f"labels in {path} are invalid", problems)
        if "split" not in self.columns:
            return {"train": splits["train"]}
        return splits

    def _check_group_columns(self, path: Path) -> None:
        """Each of `data.group_columns` is in the table's header (read alone, before any row)."""
        if not self.group_columns:
            return
        header = [
            str(c).strip() for c in read_csv(path, nrows=0, dtype=str, encoding="utf-8-sig").columns
        ]
        for column in self.group_columns:
            if column not in header:
                raise DataValidationError(
                    f"{path}: data.group_columns names column {column!r}, which this table lacks "
                    f"(columns: {header}); fix the name or remove it from data.group_columns"
                )

    def _grade(self, value: object, task: str, where: str, problems: list[str]) -> int:
        """A grade from a cell (integer, or text through the task's map); -1 = not graded."""
        if task not in self.columns or is_blank(value):
            return -1
        column = self.columns[task]
        mapping = self.maps[task]
        if mapping is None:
            return parse_grade(value, MAX_GRADE[task], where, problems, column)
        where = f"{where}, column {column!r}"
        text = str(value).strip()
        if text.lower() not in mapping:
            problems.append(
                f"{where}: value {text!r} is not in data.{task}_map (known: {sorted(mapping)})"
            )
            return -1
        return mapping[text.lower()]

    def _laterality(self, value: object, where: str, problems: list[str]) -> str:
        """``L``/``R`` from a laterality cell; "" when blank or without a laterality column."""
        if "laterality" not in self.columns or is_blank(value):
            return ""
        text = str(value).strip()
        eye = LATERALITY.get(text.lower())
        if eye is None:
            problems.append(
                f"{where}, column {self.columns['laterality']!r}: laterality {text!r} is not "
                "L, R, left, right, OS or OD"
            )
            return ""
        return eye

    def _split(self, value: object, where: str, problems: list[str]) -> str | None:
        text = "" if is_blank(value) else str(value).strip()
        split = SPLIT_NAMES.get(text.lower())
        if split is None:
            problems.append(
                f"{where}, column {self.columns['split']!r}: split {text!r} is not "
                "train, val or test"
            )
        return split

    def _resolve(self, name: str, listings: dict[Path, Listing]) -> Path:
        """The image file for a cell; case-insensitive, extensions tried when the name has none."""
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.root / path
        if self.image_suffix and path.suffix.lower() not in IMAGE_EXTENSIONS:
            path = path.with_name(path.name + self.image_suffix)
        folder = path.parent
        if folder not in listings:
            files = {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}
            listings[folder] = files, {n.lower(): p for n, p in files.items()}
        files, lowered = listings[folder]
        if path.name in files:
            return files[path.name]
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return lowered.get(path.name.lower(), path)
        return resolve_image(folder, path.name, files)
