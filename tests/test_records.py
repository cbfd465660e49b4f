"""The stratified, seeded validation split."""

from collections import Counter
from pathlib import Path

import pytest

from visioncare.data.records import Record, stratified_split


def _records(n: int) -> list[Record]:
    labels = [(0, 0), (2, 0), (2, 2), (3, 1), (4, 2)]
    return [
        Record(Path(f"{i}.jpg"), *labels[i % len(labels)], "x", f"x/train/{i:03d}")
        for i in range(n)
    ]


def test_split_is_exact_stratified_and_seeded():
    records = _records(100)
    train, val = stratified_split(records, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert not {r.key for r in train} & {r.key for r in val}
    assert Counter((r.dr, r.dme) for r in val) == {
        label: 4 for label in Counter((r.dr, r.dme) for r in records)
    }
    again_train, again_val = stratified_split(list(reversed(records)), 0.2, seed=0)
    assert again_val == val and again_train == train
    assert stratified_split(records, 0.2, seed=1)[1] != val


def test_singletons_stay_in_training_and_bad_fraction_fails():
    records = _records(3)
    train, val = stratified_split(records, 0.5, seed=0)
    assert len(train) == 3 and val == []
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(records, 1.0, seed=0)


def test_patients_stay_together_stratified_on_the_worse_eye():
    """60 patients with two eyes (grades may differ): whole patients move, by the worse eye."""
    records = []
    for p in range(60):
        worse = p % 5
        for eye, dr in (("L", worse), ("R", max(0, worse - p % 2))):
            key = f"x/{p:02d}_{eye}"
            records.append(Record(Path(f"{key}.jpg"), dr, 0, "x", key, f"{p:02d}", eye))
    train, val = stratified_split(records, 0.2, seed=3)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert len(val) == 2 * 12  # round(60 patients * 0.2) patients, both eyes each
    worst = Counter(max(r.dr for r in val if r.patient == p) for p in {r.patient for r in val})
    # 12 patients per worse-eye grade, quota 2.4 each: 2 each, the 2 left over by remainder.
    assert worst == {0: 3, 1: 3, 2: 2, 3: 2, 4: 2}
    assert stratified_split(list(reversed(records)), 0.2, seed=3) == (train, val)


def test_patient_from_name():
    from visioncare.data.records import patient_from_name

    assert patient_from_name("10_left") == ("10", "L")
    assert patient_from_name("p7-OD") == ("p7", "R")
    assert patient_from_name("IDRiD_001") == ("", "")
