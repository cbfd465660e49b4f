"""IDRiD loader on replica trees in the published layout, quirks included."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from visioncare.data.sources.idrid import IDRiDSource
from visioncare.data.validation import validate_records
from visioncare.errors import DataValidationError

GRADING = "B. Disease Grading"
TRAIN_CSV = "a. IDRiD_Disease Grading_Training Labels.csv"
TEST_CSV = "b. IDRiD_Disease Grading_Testing Labels.csv"


def make_idrid(
    root: Path,
    train_rows: list[tuple[str, str, str]],
    test_rows: list[tuple[str, str, str]],
    *,
    header: str = "Image name,Retinopathy grade,Risk of macular edema ",
    trailing: str = "",
    newline: str = "\n",
    nested: bool = False,
    suffix: str = ".jpg",
) -> Path:
    """A tiny IDRiD copy; rows are (name, dr, dme) as strings (written verbatim)."""
    grading = root / GRADING / GRADING if nested else root / GRADING
    for folder, csv_name, rows in (
        ("a. Training Set", TRAIN_CSV, train_rows),
        ("b. Testing Set", TEST_CSV, test_rows),
    ):
        images = grading / "1. Original Images" / folder
        images.mkdir(parents=True, exist_ok=True)
        labels = grading / "2. Groundtruths"
        labels.mkdir(parents=True, exist_ok=True)
        lines = [header + trailing] + [f"{n},{dr},{dme}{trailing}" for n, dr, dme in rows]
        (labels / csv_name).write_bytes(newline.join(lines).encode() + newline.encode())
        for name, *_ in rows:
            image = np.zeros((60, 90, 3), np.uint8)
            cv2.circle(image, (45, 30), 28, (40, 80, 200), -1)
            cv2.imwrite(str(images / f"{name.strip()}{suffix}"), image)
    return root


def test_reads_published_quirks(tmp_path):
    root = make_idrid(
        tmp_path,
        [("IDRiD_001", "2", "1"), ("IDRiD_002", " 0", "0 ")],
        [("IDRiD_001", "4", "2")],
        trailing=",,,,,,,,,",
        newline="\r\n",
    )
    splits = IDRiDSource(root).load()
    train, test = splits["train"], splits["test"]
    assert [(r.dr, r.dme) for r in train] == [(2, 1), (0, 0)]
    assert [(r.dr, r.dme) for r in test] == [(4, 2)]
    # Test numbering restarts at 001: keys differ by split, files by folder.
    assert train[0].key == "idrid/train/IDRiD_001" and test[0].key == "idrid/test/IDRiD_001"
    assert train[0].image != test[0].image and test[0].image.is_file()


@pytest.mark.parametrize("point_at", ["parent", "grading", "nested"])
def test_root_may_point_at_several_levels(tmp_path, point_at):
    make_idrid(
        tmp_path, [("IDRiD_001", "1", "0")], [("IDRiD_001", "0", "0")], nested=point_at == "nested"
    )
    root = tmp_path / GRADING if point_at == "grading" else tmp_path
    assert len(IDRiDSource(root).load()["train"]) == 1


def test_upper_case_extension_and_header_without_trailing_space(tmp_path):
    make_idrid(
        tmp_path,
        [("IDRiD_001", "3", "2")],
        [("IDRiD_001", "0", "0")],
        header="Image name,Retinopathy grade,Risk of macular edema",
        suffix=".JPG",
    )
    record = IDRiDSource(tmp_path).load()["train"][0]
    assert record.image.name == "IDRiD_001.JPG"


def test_bad_labels_are_all_reported_with_file_and_row(tmp_path):
    make_idrid(
        tmp_path,
        [("IDRiD_001", "7", "1"), ("IDRiD_002", "two", "0"), ("IDRiD_003", "1", "1.5")],
        [("IDRiD_001", "0", "0")],
    )
    with pytest.raises(DataValidationError) as error:
        IDRiDSource(tmp_path).load()
    message = str(error.value)
    assert "3 problem(s)" in message
    # Line numbers count lines of the file (header = line 1); each names the image and column.
    where = f"{TRAIN_CSV}, line 2 (header = line 1), image 'IDRiD_001', column 'Retinopathy grade'"
    assert f"{where}: grade '7' is outside 0..4" in message
    two = "line 3 (header = line 1), image 'IDRiD_002', column 'Retinopathy grade': grade 'two'"
    assert two in message
    assert (
        "line 4 (header = line 1), image 'IDRiD_003', column 'Risk of macular edema': "
        "grade '1.5' is outside 0..2"
    ) in message


def test_misspelled_column_names_expected_and_found(tmp_path):
    make_idrid(
        tmp_path,
        [("IDRiD_001", "1", "0")],
        [("IDRiD_001", "0", "0")],
        header="Image name,Retinopathy grade,Risk of macula edema",
    )
    with pytest.raises(
        DataValidationError, match=r"missing column\(s\) \['Risk of macular edema'\]"
    ):
        IDRiDSource(tmp_path).load()


def test_missing_root_and_missing_layout(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        IDRiDSource(tmp_path / "nope").load()
    with pytest.raises(DataValidationError, match="no IDRiD Disease Grading data"):
        IDRiDSource(tmp_path).load()


def test_header_only_table(tmp_path):
    make_idrid(tmp_path, [], [("IDRiD_001", "0", "0")])
    with pytest.raises(DataValidationError, match="header but no rows"):
        IDRiDSource(tmp_path).load()


def test_utf8_bom_in_the_label_file(tmp_path):
    root = make_idrid(tmp_path, [("IDRiD_001", "2", "2")], [("IDRiD_001", "0", "0")])
    csv_path = root / GRADING / "2. Groundtruths" / TRAIN_CSV
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert [(r.dr, r.dme) for r in IDRiDSource(root).load()["train"]] == [(2, 2)]


def test_duplicate_image_with_conflicting_labels_is_reported(tmp_path):
    make_idrid(
        tmp_path, [("IDRiD_001", "2", "1"), ("IDRiD_001", "3", "1")], [("IDRiD_001", "0", "0")]
    )
    splits = IDRiDSource(tmp_path).load()
    with pytest.raises(DataValidationError) as error:
        validate_records(splits, "idrid")
    assert "idrid/train/IDRiD_001: listed more than once" in str(error.value)
    assert "conflicting labels (DR, DME) [(2, 1), (3, 1)]" in str(error.value)
