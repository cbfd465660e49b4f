"""The one record type every dataset source yields, and the seeded, grouped, stratified split
that draws both the test hold-out and the validation split."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from visioncare.data.dicom import dicom_identity
from visioncare.errors import ConfigurationError


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
        groups: (column, value) pairs of the subgroups the data names for this image: the
            columns of `data.group_columns` (CSV tables) and ``camera`` (DICOM header), in that
            order; eval reports metrics per value, predictions.csv carries them.
    """

    image: Path
    dr: int
    dme: int
    source: str
    key: str
    patient: str = ""
    laterality: str = ""
    groups: tuple[tuple[str, str], ...] = ()

    @property
    def group(self) -> str:
        """What splits and per-patient metrics keep together: the patient, or the image."""
        return f"{self.source}/patient:{self.patient}" if self.patient else self.key


def stratified_split(
    records: Sequence[Record], fraction: float, seed: int, key: str = "data.val_fraction"
) -> tuple[list[Record], list[Record]]:
    """Split off ``fraction`` of the patients, stratified on their joint (DR, DME) label.

    Grouped by patient (`Record.group`): all images of a patient land on the same side, so a
    patient's second eye never validates (or tests) a model trained on the first. A patient's
    label is the worse eye's (max DR, max DME), the clinical rule. Records without a patient id
    are their own group, which makes this the plain per-image stratified split.

    Deterministic for a seed and independent of the input order (groups are sorted by id), so
    the same patients form the held-out set in every run. The held-out size is
    ``round(groups * fraction)`` groups, shared among the joint classes by largest remainder; a
    class never gives away its last group.

    ``key`` is the config key of ``fraction``, for the error message.

    Returns:
        (train, held_out)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{key} must be in [0, 1), got {fraction}")
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.key):
        groups[record.group].append(record)
    by_label: dict[tuple[int, int], list[list[Record]]] = defaultdict(list)
    for group_id in sorted(groups):
        members = groups[group_id]
        label = (max(r.dr for r in members), max(r.dme for r in members))
        by_label[label].append(members)
    labels = sorted(by_label)
    quotas = [len(by_label[label]) * fraction for label in labels]
    counts = [int(q) for q in quotas]
    remaining = round(len(groups) * fraction) - sum(counts)
    for i in sorted(range(len(labels)), key=lambda i: (counts[i] - quotas[i], i)):
        if remaining <= 0:
            break
        if counts[i] < len(by_label[labels[i]]) - 1:
            counts[i] += 1
            remaining -= 1
    rng = np.random.default_rng(seed)
    train: list[Record] = []
    held_out: list[Record] = []
    for label, n_out in zip(labels, counts, strict=True):
        members = by_label[label]
        n_out = min(n_out, len(members) - 1)
        order = rng.permutation(len(members))
        for i in order[:n_out]:
            held_out.extend(members[i])
        for i in order[n_out:]:
            train.extend(members[i])
    return sorted(train, key=lambda r: r.key), sorted(held_out, key=lambda r: r.key)


def check_test_fraction(fraction: float) -> float:
    """A test share in (0, 1), checked when the config is read, not after loading 35k rows.

    0 is refused too: every dataset needs a test split.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigurationError(
            f"data.test_fraction must be in (0, 1), got {fraction} (the share held out as test "
            "where a dataset ships no test split)"
        )
    return float(fraction)


def hold_out(
    splits: Mapping[str, Sequence[Record]], split: str, fraction: float, seed: int, key: str
) -> dict[str, list[Record]]:
    """``split`` carved out of ``train`` (`stratified_split`), per source, where it ships none.

    Per source, so a combined run holds out every dataset in its own proportions and a source
    that ships ``split`` keeps it. A source's held-out records are the same whether it is loaded
    alone or combined with others (the split sees only that source's records). ``key`` names
    ``fraction`` in errors.

    Returns:
        ``splits`` with ``train`` and ``split`` replaced (other splits as they were).
    """
    shipped = {r.source for r in splits.get(split, [])}
    train = [r for r in splits["train"] if r.source in shipped]
    held_out = list(splits.get(split, []))
    for source in sorted({r.source for r in splits["train"]} - shipped):
        records = [r for r in splits["train"] if r.source == source]
        kept, out = stratified_split(records, fraction, seed, key)
        train += kept
        held_out += out
    return {**{s: list(rs) for s, rs in splits.items()}, "train": train, split: held_out}


_EYE_NAME = re.compile(r"^(?P<patient>.+?)[_\-. ](?P<eye>left|right|od|os)$", re.IGNORECASE)
_LATERALITY = {"left": "L", "os": "L", "right": "R", "od": "R"}


def with_dicom_identity(records: Sequence[Record]) -> list[Record]:
    """Records of DICOM files get the header's PatientID and ImageLaterality where unknown, and
    the camera (``Manufacturer ManufacturerModelName``) as the ``camera`` group.

    A clinic's camera export names its files by UID, not ``10_left``; the header says whose eye
    it is, so splits keep that patient's eyes together like any other source's. A DICOM without
    camera tags is in the group ``unknown``, so every DICOM image has a camera value.
    """
    out = []
    for record in records:
        if record.image.suffix.lower() in (".dcm", ".dicom"):
            identity = dicom_identity(record.image)
            record = replace(
                record,
                patient=record.patient or identity.patient,
                laterality=record.laterality or identity.laterality,
                groups=(*record.groups, ("camera", identity.camera or "unknown")),
            )
        out.append(record)
    return out


def patient_from_name(stem: str) -> tuple[str, str]:
    """(patient id, laterality) from a file stem such as EyePACS' ``10_left``; ("", "") if none.

    Recognises a trailing ``left``/``right`` or ``OD``/``OS`` after ``_``, ``-``, ``.`` or a
    space (any case): ``10_left`` → ("10", "L"), ``p7-OD`` → ("p7", "R").
    """
    match = _EYE_NAME.match(stem)
    if match is None:
        return "", ""
    return match["patient"], _LATERALITY[match["eye"].lower()]
