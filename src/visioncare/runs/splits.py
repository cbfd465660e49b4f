"""The record of a run's data splits: `splits.csv` (one row per image) and its sha256.

A model's numbers mean something only with the exact images behind them. Training writes
`splits.csv` in its run directory (image, source, patient, laterality, split, dr, dme) and its
sha256 in `summary.json`; eval on the checkpoint's own data rebuilds the splits and compares
them with the file, warning by name when images were added, removed, moved to another split or
relabelled (the data changed underneath the checkpoint, so its test numbers are not comparable).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from visioncare.data.records import Record

log = logging.getLogger("visioncare")

FILENAME = "splits.csv"
COLUMNS = ("image", "source", "patient", "laterality", "split", "dr", "dme")
# At most this many image names per kind of change in a warning (the rest are counted).
_NAMED = 5


def split_rows(splits: Mapping[str, Sequence[Record]]) -> list[dict[str, str]]:
    """One row per image, ordered by split then image path (so equal splits give equal files)."""
    rows = [
        {
            "image": str(record.image),
            "source": record.source,
            "patient": record.patient,
            "laterality": record.laterality,
            "split": split,
            "dr": str(int(record.dr)),
            "dme": str(int(record.dme)),
        }
        for split, records in splits.items()
        for record in records
    ]
    return sorted(rows, key=lambda row: (row["split"], row["image"]))


def _csv_text(rows: Sequence[Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def splits_sha256(rows: Sequence[Mapping[str, str]]) -> str:
    """sha256 of the exact `splits.csv` text these rows make."""
    return hashlib.sha256(_csv_text(rows).encode()).hexdigest()


def write_splits(run_dir: Path, splits: Mapping[str, Sequence[Record]]) -> str:
    """Write `<run_dir>/splits.csv`; returns its sha256 (for summary.json)."""
    rows = split_rows(splits)
    text = _csv_text(rows)
    (run_dir / FILENAME).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def read_splits(path: Path) -> list[dict[str, str]]:
    """The rows of a `splits.csv`."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def describe_changes(
    stored: Sequence[Mapping[str, str]], current: Sequence[Mapping[str, str]]
) -> list[str]:
    """What differs between two split records, in words (empty: the same images and splits)."""
    before = {row["image"]: row for row in stored}
    after = {row["image"]: row for row in current}
    changes = []

    def named(kind: str, images: list[str]) -> None:
        if images:
            shown = ", ".join(sorted(images)[:_NAMED])
            more = f" and {len(images) - _NAMED} more" if len(images) > _NAMED else ""
            changes.append(f"{len(images)} image(s) {kind}: {shown}{more}")

    named("added", [i for i in after if i not in before])
    named("removed", [i for i in before if i not in after])
    common = [i for i in after if i in before]
    named("moved to another split", [i for i in common if after[i]["split"] != before[i]["split"]])

    def labels(row: Mapping[str, str]) -> tuple[str, str]:
        return row["dr"], row["dme"]

    named("relabelled", [i for i in common if labels(after[i]) != labels(before[i])])
    return changes


def check_splits(run_dir: Path, splits: Mapping[str, Sequence[Record]]) -> list[str]:
    """Compare rebuilt splits with the run's `splits.csv`; warn (and return) what changed.

    A run without `splits.csv` (trained before it existed) is not checked.
    """
    path = run_dir / FILENAME
    if not path.is_file():
        log.info("%s not found: the data cannot be checked against the training run", path)
        return []
    current = split_rows(splits)
    if splits_sha256(current) == splits_sha256(read_splits(path)):
        log.info("Data splits match the training run's %s", path)
        return []
    changes = describe_changes(read_splits(path), current)
    changes = changes or ["the split records differ (patient, laterality or source columns)"]
    log.warning(
        "The data changed since training (compared with %s): %s. Metrics are not comparable "
        "with the training run's.",
        path,
        "; ".join(changes),
    )
    return changes
