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
