"""The one record type every dataset source yields, and the seeded stratified validation split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Record:
    """One fundus image and its grades.

    Attributes:
        image: path of the image file.
        dr: DR grade 0-4, or -1 when not graded.
        dme: DME grade 0-2, or -1 when not graded.
        source: dataset name (e.g. ``idrid``), for per-source metrics.
        key: stable unique id, split included (IDRiD train and test images share file names).
        patient: id of the person photographed, unique within the source ("" = unknown: the
            image is treated as its own patient). Splits never separate a patient's images.
        laterality: ``L`` or ``R`` where known, else "".
    """

    image: Path
    dr: int
    dme: int
    source: str
    key: str
    patient: str = ""
    laterality: str = ""

    @property
    def group(self) -> str:
        """What splits and per-patient metrics keep together: the patient, or the image."""
        return f"{self.source}/patient:{self.patient}" if self.patient else self.key


def stratified_split(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Split off ``fraction`` of the records, stratified on the joint (DR, DME) label.

    Deterministic for a seed and independent of the input order (records are sorted by key), so
    the same images form the validation set in every run. The validation size is
    ``round(len(records) * fraction)``, shared among the joint classes by largest remainder; a
    class never gives away its last image.

    Returns:
        (train, val)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
    by_label: dict[tuple[int, int], list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.key):
        by_label[(record.dr, record.dme)].append(record)
    labels = sorted(by_label)
    quotas = [len(by_label[label]) * fraction for label in labels]
    counts = [int(q) for q in quotas]
    remaining = round(len(records) * fraction) - sum(counts)
    for i in sorted(range(len(labels)), key=lambda i: (counts[i] - quotas[i], i)):
        if remaining <= 0:
            break
        if counts[i] < len(by_label[labels[i]]) - 1:
            counts[i] += 1
            remaining -= 1
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, n_val in zip(labels, counts, strict=True):
        group = by_label[label]
        n_val = min(n_val, len(group) - 1)
        order = rng.permutation(len(group))
        val.extend(group[i] for i in order[:n_val])
        train.extend(group[i] for i in order[n_val:])
    return sorted(train, key=lambda r: r.key), sorted(val, key=lambda r: r.key)
