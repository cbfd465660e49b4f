"""Helpers shared by the dataset sources: lenient label tables, grades, image lookup."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from visioncare.data.records import Record, patient_from_name
from visioncare.errors import DataValidationError

# Tried in order for names listed without extension (DICOM last: clinics' exports).
IMAGE_SUFFIXES = (
    ".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".tif", ".tiff", ".dcm", ".DCM",
)  # fmt: skip


def read_label_table(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """Read a label CSV leniently (BOM, CRLF, stray spaces, empty trailing columns).

    Returns a frame with columns ``image``, ``dr``, ``dme`` (strings), plus ``row`` = the line
    number in the file (header = line 1) for error messages; blank lines keep their number.
    """
    if not path.is_file():
        raise DataValidationError(f"label file not found: {path}")
    try:
        # Only truly empty cells are missing: "None"/"NA" may be label values in a user's table.
        table = pd.read_csv(
            path,
            dtype=str,
            encoding="utf-8-sig",
            skipinitialspace=True,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
        )
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


def row_location(path: Path, line: int, image: object) -> str:
    """Where a table row is, for problem reports: the file, its line and the row's image.

    ``line`` counts lines of the file with the header as line 1 (what an editor shows), and the
    image key finds the row again after the table was sorted or filtered.
    """
    name = "" if is_blank(image) else f", image {str(image).strip()!r}"
    return f"{path}, line {line} (header = line 1){name}"


def parse_grade(
    value: object, max_grade: int, where: str, problems: list[str], column: str = ""
) -> int:
    """An integer grade in 0..max_grade, or -1 for an empty cell; records a problem otherwise.

    ``column`` (the table's header name) is added to ``where`` in the problem report.
    """
    if value is None or (isinstance(value, float) and pd.isna(value)) or str(value) == "":
        return -1
    where = f"{where}, column {column!r}" if column else where
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
    for suffix in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".dcm"):
        if f"{name}{suffix}".lower() in lowered:
            return lowered[f"{name}{suffix}".lower()]
    return direct if Path(name).suffix else folder / f"{name}.jpg"


def is_blank(value: object) -> bool:
    """An empty cell as `read_label_table` returns it (NaN, None or whitespace)."""
    return value is None or (isinstance(value, float) and pd.isna(value)) or not str(value).strip()


def read_dr_only_table(
    labels: Path,
    columns: dict[str, str],
    folder: Path,
    source: str,
    key_prefix: str,
    default_suffix: str,
    problems: list[str],
    eyes_in_names: bool = False,
) -> list[Record]:
    """Records of a DR-only label table (APTOS, EyePACS): DME stays ungraded (-1).

    Problems are collected in ``problems`` with file and row, not raised one by one.
    ``default_suffix`` names the file the dataset ships when a name has no extension and no
    file matches (so the missing-file report shows the expected name). With ``eyes_in_names``
    the patient id and laterality come from names such as ``10_left`` (`patient_from_name`).
    """
    table = read_label_table(labels, columns)
    listing = {p.name: p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    records = []
    for row in table.itertuples(index=False):
        where = row_location(labels, row.row, row.image)
        if is_blank(row.image):
            problems.append(f"{where}: empty {columns['image']}")
            continue
        if is_blank(row.dr):
            problems.append(f"{where}: empty {columns['dr']} (the only grade {source} has)")
            continue
        dr = parse_grade(row.dr, 4, where, problems, columns["dr"])
        image = resolve_image(folder, row.image, listing)
        if not image.is_file() and not Path(row.image).suffix:
            image = folder / f"{row.image}{default_suffix}"
        patient, laterality = patient_from_name(Path(row.image).stem) if eyes_in_names else ("", "")
        key = f"{source}/{key_prefix}{row.image}"
        patient = f"{key_prefix}{patient}" if patient else ""
        records.append(Record(image, dr, -1, source, key, patient, laterality))
    return records
