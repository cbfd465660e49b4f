"""Checks on a dataset's records before training, reporting every offender at once."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from visioncare.data.records import Record
from visioncare.errors import DataValidationError


def validate_records(splits: Mapping[str, Sequence[Record]], source: str) -> None:
    """Missing files, empty splits, duplicate keys, one image with conflicting labels.

    Raises:
        DataValidationError: listing the first 20 problems and their count.
    """
    problems: list[str] = []
    if not splits.get("train"):
        problems.append(f"{source}: the training split has no images")
    seen_keys: set[str] = set()
    labels_by_image: dict[Path, set[tuple[int, int]]] = defaultdict(set)
    for split, records in splits.items():
        for record in records:
            if record.key in seen_keys:
                problems.append(f"{record.key}: listed more than once")
            seen_keys.add(record.key)
            if not record.image.is_file():
                problems.append(f"{record.key}: image file not found: {record.image}")
            labels_by_image[record.image].add((record.dr, record.dme))
            if record.dr == -1 and record.dme == -1:
                problems.append(f"{record.key} ({split}): neither a DR nor a DME grade")
    for image, labels in labels_by_image.items():
        if len(labels) > 1:
            problems.append(f"{image}: conflicting labels (DR, DME) {sorted(labels)}")
    if problems:
        raise DataValidationError.from_problems(
            f"dataset '{source}' failed validation",
            problems,
            hint="Fix or remove these entries, or point data.root at a complete copy.",
        )
