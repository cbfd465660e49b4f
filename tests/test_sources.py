"""APTOS, EyePACS, Messidor-2 and CSV-table sources on replica trees in each dataset's layout."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate

from tests.test_idrid import make_idrid
from visioncare.data.datamodule import FundusDataModule
from visioncare.data.records import Record, hold_out
from visioncare.data.sources.aptos import APTOSSource
from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.csv_table import CSVTableSource
from visioncare.data.sources.eyepacs import EyePACSSource
from visioncare.data.sources.messidor2 import Messidor2Source
from visioncare.errors import ConfigurationError, DataValidationError
from visioncare.tasks.train import run as train

# Two images per DR grade: the smallest set a stratified hold-out splits without emptying a class.
GRADES = [g for g in range(5) for _ in range(2)]


def write_image(path: Path) -> None:
    """A tiny 40x60 'fundus': a bright disc on black, enough for the crop and the cache."""
    image = np.zeros((40, 60, 3), np.uint8)
    cv2.circle(image, (30, 20), 18, (40, 80, 200), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def make_aptos(root: Path, grades: list[int] = GRADES, *, reverse: bool = False) -> Path:
    """``train.csv`` (id_code,diagnosis) + ``train_images/<id_code>.png``; ids are 12 hex digits."""
    rows = [(f"{0x1A2B3C000000 + i:012x}", grade) for i, grade in enumerate(grades)]
    for id_code, _ in rows:
        write_image(root / "train_images" / f"{id_code}.png")
    lines = [f"{id_code},{grade}" for id_code, grade in rows]
    write_csv(root / "train.csv", "id_code,diagnosis", lines[::-1] if reverse else lines)
    write_csv(root / "test.csv", "id_code", ["ffffffffffff"])  # unlabelled: ignored
    return root


def eye_names(first: int, count: int) -> list[str]:
    """Kaggle's names: one row per eye, ``<patient>_left`` then ``<patient>_right``."""
    return [f"{first + i // 2}_{('left', 'right')[i % 2]}" for i in range(count)]


def make_eyepacs(
    root: Path,
    grades: list[int] = GRADES,
    test_grades: list[int] | None = None,
    *,
    image_dir: str | None = "train",
    test_dir: bool = True,
    both_eyes: bool = False,
) -> Path:
    """``trainLabels.csv`` (image,level), ``train/<n>_left.jpeg``; optionally the test split.

    Training rows are one left eye per patient unless ``both_eyes`` (then patient by patient,
    left then right), so the per-image expectations of the shared tests hold.
    """
    folder = root / image_dir if image_dir else root
    if both_eyes:
        names = eye_names(10, len(grades))
    else:
        names = [f"{10 + i}_left" for i in range(len(grades))]
    for name in names:
        write_image(folder / f"{name}.jpeg")
    rows = [f"{n},{g}" for n, g in zip(names, grades, strict=True)]
    write_csv(root / "trainLabels.csv", "image,level", rows)
    if test_grades is not None:
        test_names = eye_names(1, len(test_grades))
        test_rows = [
            f"{n},{g},{('Public', 'Private')[i % 2]}"
            for i, (n, g) in enumerate(zip(test_names, test_grades, strict=True))
        ]
        write_csv(root / "testLabels.csv", "image,level,Usage", test_rows)
        if test_dir:
            for name in test_names:
                write_image(root / "test" / f"{name}.jpeg")
    return root


def messidor_name(i: int) -> str:
    """Messidor-2 mixes Messidor-1 style ``.png`` names and ``IMxxxxxx.JPG`` names."""
    return f"20051020_{43800 + i}_0100_PP.png" if i % 2 == 0 else f"IM{2380 + i:06d}.JPG"


def make_messidor2(
    root: Path, grades: list[int] = GRADES, extra_rows: tuple[str, ...] = ()
) -> Path:
    """``messidor_data.csv`` + ``IMAGES/``; referable DME = 1 for DR >= 3 (as a stand-in)."""
    rows = []
    for i, grade in enumerate(grades):
        name = messidor_name(i)
        write_image(root / "IMAGES" / name)
        rows.append(f"{name}, {grade}, {int(grade >= 3)}, 1")
    header = "image_id, adjudicated_dr_grade, adjudicated_dme, adjudicated_gradable"
    write_csv(root / "messidor_data.csv", header, [*rows, *extra_rows])
    return root


def make_table(root: Path, grades: list[int] = GRADES) -> Path:
    """A generic table: ``labels.csv`` (image,dr,dme) + ``img_<i>.png`` under root.

    Two images per joint (DR, DME) label: `stratified_split` never gives away a class's last
    image, so singleton joint classes would shrink the held-out splits.
    """
    rows = []
    for i, grade in enumerate(grades):
        write_image(root / f"img_{i}.png")
        rows.append(f"img_{i}.png,{grade},{max(0, grade - 2)}")  # DME > 0 only with DR >= 2
    write_csv(root / "labels.csv", "image,dr,dme", rows)
    return root


BUILDERS: dict[str, tuple[Callable[[Path], Path], Callable[..., DatasetSource]]] = {
    "aptos": (make_aptos, APTOSSource),
    "eyepacs": (make_eyepacs, EyePACSSource),
    "messidor2": (make_messidor2, Messidor2Source),
    "csv": (make_table, partial(CSVTableSource, table="labels.csv")),
}


def keys(records: list[Record]) -> list[str]:
    return [r.key for r in records]


def held_out(source: DatasetSource, fraction: float = 0.2, seed: int = 0) -> dict[str, list]:
    """The source's splits with test drawn as the datamodule draws it (defaults = conf/data)."""
    return hold_out(source.load(), "test", fraction, seed, "data.test_fraction")


# ---------------------------------------------------------------------------------- APTOS
def test_aptos_records_labels_and_keys(tmp_path):
    root = make_aptos(tmp_path)
    assert set(APTOSSource(root).load()) == {"train"}  # no official test split
    splits = held_out(APTOSSource(root))
    assert set(splits) == {"train", "test"}
    assert (len(splits["train"]), len(splits["test"])) == (8, 2)
    records = splits["train"] + splits["test"]
    assert sorted(r.dr for r in records) == GRADES
    assert all(r.dme == -1 and r.source == "aptos" and r.image.is_file() for r in records)
    first = next(r for r in records if r.key == "aptos/1a2b3c000000")
    assert first.image == root / "train_images" / "1a2b3c000000.png" and first.dr == 0


def test_aptos_bad_and_empty_diagnosis_all_reported(tmp_path):
    root = make_aptos(tmp_path)
    write_csv(root / "train.csv", "id_code,diagnosis", ["a1,5", "a2,", "a3,mild", "a4,2"])
    with pytest.raises(DataValidationError) as error:
        APTOSSource(root).load()
    message = str(error.value)
    assert "3 problem(s)" in message
    line = "train.csv, line {} (header = line 1), image '{}'"
    assert f"{line.format(2, 'a1')}, column 'diagnosis': grade '5' is outside 0..4" in message
    assert f"{line.format(3, 'a2')}: empty diagnosis" in message
    assert f"{line.format(4, 'a3')}, column 'diagnosis': grade 'mild' is not an integer" in message


# -------------------------------------------------------------------------- hold-out split
@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_held_out_test_split_is_deterministic_and_disjoint(tmp_path, dataset):
    build, source = BUILDERS[dataset]
    root = build(tmp_path)
    assert set(source(root).load()) == {"train"}  # the test split is the datamodule's to draw
    first, again = held_out(source(root)), held_out(source(root))
    assert keys(first["test"]) == keys(again["test"])
    assert not set(keys(first["train"])) & set(keys(first["test"]))
    assert len(first["train"]) + len(first["test"]) == len(GRADES)
    assert len(first["test"]) == round(0.2 * len(GRADES))
    # Stratified: no DR grade appears twice in a 2-image test set drawn from 5 balanced classes.
    assert len({r.dr for r in first["test"]}) == len(first["test"])
    other_seeds = [keys(held_out(source(root), seed=s)["test"]) for s in range(1, 6)]
    assert any(k != keys(first["test"]) for k in other_seeds)
    bigger = held_out(source(root), 0.5)
    assert len(bigger["test"]) == 5


def test_held_out_split_ignores_row_order(tmp_path):
    forward = held_out(APTOSSource(make_aptos(tmp_path / "a")))
    backward = held_out(APTOSSource(make_aptos(tmp_path / "b", reverse=True)))
    assert keys(forward["test"]) == keys(backward["test"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_test_fraction_out_of_range_is_a_config_error(tmp_path, fraction):
    with pytest.raises(ConfigurationError, match=r"data\.test_fraction"):
        FundusDataModule(APTOSSource, root=str(tmp_path), test_fraction=fraction)


# -------------------------------------------------------------------------------- EyePACS
def test_eyepacs_uses_official_test_labels_when_present(tmp_path):
    root = make_eyepacs(tmp_path, test_grades=[0, 2, 4])
    splits = EyePACSSource(root).load()
    assert len(splits["train"]) == len(GRADES)
    assert keys(splits["test"]) == [
        "eyepacs/test/1_left",
        "eyepacs/test/1_right",
        "eyepacs/test/2_left",
    ]
    assert [r.dr for r in splits["test"]] == [0, 2, 4]
    assert splits["test"][0].image == root / "test" / "1_left.jpeg"
    train = {r.key: r for r in splits["train"]}
    assert train["eyepacs/10_left"].image == root / "train" / "10_left.jpeg"
    assert all(r.dme == -1 and r.image.is_file() for r in splits["train"] + splits["test"])


def test_eyepacs_images_directly_under_root_and_no_test_labels(tmp_path):
    root = make_eyepacs(tmp_path, image_dir=None)
    splits = held_out(EyePACSSource(root))
    assert (len(splits["train"]), len(splits["test"])) == (8, 2)
    assert all(r.image.parent == root and r.image.is_file() for r in splits["train"])


def test_eyepacs_test_labels_without_test_images_fall_back_to_hold_out(tmp_path, caplog):
    root = make_eyepacs(tmp_path, test_grades=[0, 1], test_dir=False)
    with caplog.at_level(logging.WARNING):
        assert set(EyePACSSource(root).load()) == {"train"}
    splits = held_out(EyePACSSource(root))
    assert len(splits["test"]) == 2 and all(r.key.count("/") == 1 for r in splits["test"])
    assert "holding out" in caplog.text


def test_eyepacs_custom_image_dir(tmp_path):
    root = make_eyepacs(tmp_path, image_dir="train_512")
    records = EyePACSSource(root, image_dir="train_512").load()["train"]
    assert all(r.image.parent.name == "train_512" and r.image.is_file() for r in records)


def test_eyepacs_patients_never_span_splits(tmp_path, make_cfg):
    """Both eyes of 20 patients (4 per DR grade): hold-out and validation keep pairs together."""
    grades = [g for g in range(5) for _ in range(8)]  # patient p's eyes share grade p // 4
    root = make_eyepacs(tmp_path / "eyepacs", grades, both_eyes=True)
    splits = EyePACSSource(root).load()
    record = next(r for r in splits["train"] if r.key == "eyepacs/10_right")
    assert (record.patient, record.laterality) == ("10", "R")
    cfg = make_cfg("data=eyepacs", f"data.root={root}")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    patients = {s: {r.patient for r in rs} for s, rs in dm.splits.items()}
    assert patients["train"] and patients["val"] and patients["test"]
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    # 20 patients: 4 held out as test (0.2), then 3 of the other 16 for validation (0.2).
    assert dm.sizes() == {"num_train": 26, "num_val": 6, "num_test": 8}
    assert len({r.dr for r in dm.splits["test"]}) == 4  # stratified: 4 patients, 4 grades


def test_csv_patient_and_laterality_columns(tmp_path):
    names = [f"img_{i}.png" for i in range(8)]
    for name in names:
        write_image(tmp_path / name)
    grades = [0, 1, 0, 1, 2, 3, 2, 3]  # patients P0, P1 worse eye 1; P2, P3 worse eye 3
    rows = [f"{n},{grades[i]},0,P{i // 2},{('OS', 'od')[i % 2]}" for i, n in enumerate(names)]
    write_csv(tmp_path / "labels.csv", "image,dr,dme,person,eye", rows)
    source = CSVTableSource(
        tmp_path, table="labels.csv", patient_column="person", laterality_column="eye",
    )  # fmt: skip
    splits = held_out(source, 0.25)
    records = {r.key: r for rs in splits.values() for r in rs}
    assert (records["csv/img_3.png"].patient, records["csv/img_3.png"].laterality) == ("P1", "R")
    test_patients = {r.patient for r in splits["test"]}
    assert len(test_patients) == 1 and len(splits["test"]) == 2  # round(4 * 0.25) = 1 patient
    assert not test_patients & {r.patient for r in splits["train"]}


def test_csv_split_column_separating_a_patient_is_an_error(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    write_csv(
        tmp_path / "labels.csv",
        "image,dr,dme,fold,person,eye",
        ["a.png,0,0,train,P1,L", "b.png,1,0,test,P1,R", "c.png,2,0,test,P2,sideways"],
    )
    source = CSVTableSource(
        tmp_path, table="labels.csv", split_column="fold", patient_column="person",
        laterality_column="eye",
    )  # fmt: skip
    with pytest.raises(DataValidationError) as error:
        source.load()
    message = str(error.value)
    assert (
        "labels.csv, line 3 (header = line 1), image 'b.png': patient 'P1' is in 'test' here "
        "and in 'train' at line 2" in message
    )
    assert "line 4 (header = line 1), image 'c.png', column 'eye': laterality 'sideways'" in message


# ----------------------------------------------------------------------------- Messidor-2
def test_messidor2_png_and_upper_case_jpg_and_referable_dme(tmp_path):
    root = make_messidor2(tmp_path)
    # One copy renamed the file's extension to lower case: the table still says .JPG.
    (root / "IMAGES" / messidor_name(1)).rename(root / "IMAGES" / "IM002381.jpg")
    source = Messidor2Source(root)
    splits = source.load()
    assert set(splits) == {"train"}  # no official split
    records = {r.key: r for r in splits["train"]}
    assert len(records) == len(GRADES)
    png, jpg = records[f"messidor2/{messidor_name(0)}"], records["messidor2/IM002381.JPG"]
    assert png.image.name == messidor_name(0) and png.image.is_file()
    assert jpg.image.name == "IM002381.jpg" and jpg.image.is_file()
    assert records[f"messidor2/{messidor_name(3)}"].image.suffix == ".JPG"
    assert all(r.dme == -1 for r in records.values())
    assert sorted(r.dr for r in records.values()) == GRADES
    assert set(source.referable_dme) == set(records)
    assert all(source.referable_dme[k] == int(r.dr >= 3) for k, r in records.items())


def test_messidor2_examination_pairs_share_a_patient(tmp_path):
    """20 images = 10 examinations (2 per DR grade): the test hold-out takes whole pairs."""
    grades = [g for g in range(5) for _ in range(4)]
    root = make_messidor2(tmp_path, grades)
    names = [messidor_name(i) for i in range(len(grades))]
    rows = "left;right\n" + "".join(f"{names[i]};{names[i + 1]}\n" for i in range(0, 20, 2))
    (root / "pairs.csv").write_text(rows)
    splits = held_out(Messidor2Source(root, pairs_table="pairs.csv"))
    side = {r.key.split("/", 1)[1]: split for split, rs in splits.items() for r in rs}
    patient = {r.key.split("/", 1)[1]: r.patient for rs in splits.values() for r in rs}
    assert patient[names[2]] == patient[names[3]] == names[2]
    assert len(splits["test"]) == 4  # round(10 examinations * 0.2) = 2, both images each
    assert all(side[names[i]] == side[names[i + 1]] for i in range(0, 20, 2))
    with pytest.raises(ConfigurationError, match=r"data\.pairs_table='nope\.csv'"):
        Messidor2Source(root, pairs_table="nope.csv").load()


def test_messidor2_skips_ungradable_rows_with_a_logged_count(tmp_path, caplog):
    extra = ("IM009991.JPG, , , 0", "IM009992.JPG, 2, 0, 0", "IM009993.JPG, , , 1")
    root = make_messidor2(tmp_path, extra_rows=extra)
    source = Messidor2Source(root)
    with caplog.at_level(logging.INFO, logger="visioncare.data.sources.messidor2"):
        splits = source.load()
    assert len(splits["train"]) == len(GRADES)
    assert source.skipped == ["IM009991.JPG", "IM009992.JPG", "IM009993.JPG"]
    assert "skipped 3 ungradable row(s)" in caplog.text
    assert not any("IM00999" in k for k in source.referable_dme)


def test_eyepacs_row_lines_count_blank_lines_of_the_file(tmp_path):
    # A blank line in the middle still counts: "line 5" is where an editor shows the bad cell.
    root = make_eyepacs(tmp_path)
    write_csv(root / "trainLabels.csv", "image,level", ["10_left,0", "", "10_right,1", "11_left,9"])
    with pytest.raises(DataValidationError) as error:
        EyePACSSource(root).load()
    assert (
        "trainLabels.csv, line 5 (header = line 1), image '11_left', column 'level': "
        "grade '9' is outside 0..4"
    ) in str(error.value)


def test_messidor2_bad_cells_reported_with_row(tmp_path):
    extra = ("IM009991.JPG, 7, 0, 1", "IM009992.JPG, 2, 2, 1", "IM009993.JPG, 1, 0, maybe")
    root = make_messidor2(tmp_path, extra_rows=extra)
    with pytest.raises(DataValidationError) as error:
        Messidor2Source(root).load()
    message = str(error.value)
    assert "3 problem(s)" in message
    line = "messidor_data.csv, line {} (header = line 1), image '{}', column '{}'"
    assert line.format(12, "IM009991.JPG", "adjudicated_dr_grade") + ": grade '7' is" in message
    assert line.format(13, "IM009992.JPG", "adjudicated_dme") + ": grade '2' is" in message
    assert line.format(14, "IM009993.JPG", "adjudicated_gradable") + ": grade 'maybe'" in message


# ------------------------------------------------------------------------------ CSV table
def test_csv_maps_missing_cells_split_column_and_suffix(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / "photos" / f"{name}.tif")
    write_csv(
        tmp_path / "meta" / "grades.csv",
        "file,severity,edema,fold",
        [
            "photos/a,no DR,no,train",
            "photos/b,  MILD ,,Train",
            "photos/c,,far,validation",
            "photos/d,proliferative,near,test",
        ],
    )
    source = CSVTableSource(
        tmp_path,
        table="meta/grades.csv",
        name="clinic",
        image_column="file",
        dr_column="severity",
        dme_column="edema",
        dr_map={"no dr": 0, "mild": 1, "proliferative": 4},
        dme_map={"no": 0, "far": 1, "near": 2},
        split_column="fold",
        image_suffix="tif",
    )
    splits = source.load()
    assert {s: [(r.key, r.dr, r.dme) for r in rs] for s, rs in splits.items()} == {
        "train": [("clinic/photos/a", 0, 0), ("clinic/photos/b", 1, -1)],
        "val": [("clinic/photos/c", -1, 1)],
        "test": [("clinic/photos/d", 4, 2)],
    }
    assert all(r.image.is_file() and r.source == "clinic" for rs in splits.values() for r in rs)


def test_csv_map_keys_that_pandas_reads_as_missing(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    write_csv(tmp_path / "labels.csv", "image,dr,split", ["a.png,None,train", "b.png,NA,test"])
    splits = CSVTableSource(
        tmp_path,
        table="labels.csv",
        dme_column=None,
        dr_map={"none": 0, "na": 1},
        split_column="split",
    ).load()
    assert [r.dr for r in splits["train"]] == [0] and [r.dr for r in splits["test"]] == [1]


def test_csv_integer_grades_one_task_and_extension_lookup(tmp_path):
    write_image(tmp_path / "x1.JPG")
    write_image(tmp_path / "x2.png")
    write_csv(tmp_path / "t.csv", "name,grade", ["x1,3", "x2.PNG,0", "x3,3", "x4,0"])
    for name in ("x3.jpeg", "x4.jpg"):
        write_image(tmp_path / name)
    source = CSVTableSource(
        tmp_path,
        table=str(tmp_path / "t.csv"),
        image_column="name",
        dr_column="grade",
        dme_column=None,
    )
    splits = held_out(source, 0.25)
    records = sorted(splits["train"] + splits["test"], key=lambda r: r.key)
    assert [r.key for r in records] == ["csv/x1", "csv/x2.PNG", "csv/x3", "csv/x4"]
    assert [r.image.name for r in records] == ["x1.JPG", "x2.png", "x3.jpeg", "x4.jpg"]
    assert [(r.dr, r.dme) for r in records] == [(3, -1), (0, -1), (3, -1), (0, -1)]
    assert len(splits["test"]) == 1


def test_csv_problems_reported_with_file_and_row(tmp_path):
    table = write_csv(
        tmp_path / "labels.csv",
        "image,dr,dme",
        ["a.png,2,1", "b.png,6,0", "c.png,moderate,1", "d.png,,", "e.png,1,3", "f.png,0,0"],
    )
    with pytest.raises(DataValidationError) as error:
        CSVTableSource(tmp_path, table="labels.csv").load()
    message = str(error.value)
    assert "4 problem(s)" in message
    line = f"{table}, line {{}} (header = line 1), image '{{}}'"
    assert f"{line.format(3, 'b.png')}, column 'dr': grade '6' is outside 0..4" in message
    assert f"{line.format(4, 'c.png')}, column 'dr': grade 'moderate' is not an int" in message
    assert f"{line.format(5, 'd.png')}: neither a DR nor a DME grade" in message
    assert f"{line.format(6, 'e.png')}, column 'dme': grade '3' is outside 0..2" in message


def test_csv_unknown_map_value_and_bad_split_reported(tmp_path):
    table = write_csv(
        tmp_path / "labels.csv",
        "image,dr,split",
        ["a.png,none,train", "b.png,severe,train", "c.png,mild,holdout", "d.png,mild,test"],
    )
    with pytest.raises(DataValidationError) as error:
        CSVTableSource(
            tmp_path,
            table="labels.csv",
            dme_column=None,
            dr_map={"none": 0, "mild": 1},
            split_column="split",
        ).load()
    message = str(error.value)
    assert "2 problem(s)" in message
    assert (
        f"{table}, line 3 (header = line 1), image 'b.png', column 'dr': value 'severe' is not "
        "in data.dr_map "
        "(known: ['mild', 'none'])" in message
    )
    where = f"{table}, line 4 (header = line 1), image 'c.png', column 'split'"
    assert f"{where}: split 'holdout' is not train, val or test" in message


def test_csv_split_column_without_test_rows(tmp_path):
    write_csv(tmp_path / "labels.csv", "image,dr,split", ["a.png,0,train", "b.png,1,val"])
    with pytest.raises(DataValidationError, match="no row has 'split' = test"):
        CSVTableSource(tmp_path, table="labels.csv", dme_column=None, split_column="split").load()


def test_csv_misspelled_columns_expected_and_found(tmp_path):
    write_csv(tmp_path / "labels.csv", "image,dr_grade,dme", ["a.png,1,0"])
    with pytest.raises(DataValidationError) as error:
        CSVTableSource(tmp_path, table="labels.csv").load()
    message = str(error.value)
    assert "missing column(s) ['dr']" in message
    assert "expected ['image', 'dr', 'dme'], found ['image', 'dr_grade', 'dme']" in message
    assert "data.dr_column" in message


def test_csv_configuration_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="both null"):
        CSVTableSource(tmp_path, table="t.csv", dr_column=None, dme_column=None)
    with pytest.raises(ConfigurationError, match=r"data.dme_map\['near'\] = 3 is outside 0..2"):
        CSVTableSource(tmp_path, table="t.csv", dme_map={"near": 3})
    with pytest.raises(DataValidationError, match=r"data\.table='t\.csv'"):
        CSVTableSource(tmp_path, table="t.csv").load()


# ---------------------------------------------------------------------------- missing root
@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_missing_root_names_data_root(tmp_path, dataset):
    _, source = BUILDERS[dataset]
    with pytest.raises(DataValidationError, match=r"data\.root=.*does not exist"):
        source(tmp_path / "nowhere").load()


@pytest.mark.parametrize("dataset", ["aptos", "eyepacs", "messidor2"])
def test_root_without_the_label_file_names_data_root(tmp_path, dataset):
    _, source = BUILDERS[dataset]
    with pytest.raises(DataValidationError, match=r"no .* labels under data\.root="):
        source(tmp_path).load()


# ---------------------------------------------------------------------- Hydra + datamodule
@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_data_config_composes_and_sets_up(tmp_path, make_cfg, dataset):
    build, _ = BUILDERS[dataset]
    tree = build(tmp_path / dataset)
    cfg = make_cfg(f"data={dataset}", f"data.root={tree}")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.sizes() == {"num_train": 6, "num_val": 2, "num_test": 2}
    assert dm.source.name == dataset and dm.source.root == tree
    held = {s: [r.key.split("/", 1)[1] for r in rs] for s, rs in dm.splits.items() if s != "train"}
    assert held == SMALL_SPLITS_BEFORE[dataset]


# Test and validation keys the per-source hold-out drew (commit 939da0d, before the datamodule
# drew both): default settings must keep drawing exactly these.
SMALL_SPLITS_BEFORE = {
    "aptos": {"test": ["1a2b3c000000", "1a2b3c000002"], "val": ["1a2b3c000004", "1a2b3c000006"]},
    "eyepacs": {"test": ["10_left", "12_left"], "val": ["14_left", "16_left"]},
    "messidor2": {
        "test": ["20051020_43800_0100_PP.png", "20051020_43802_0100_PP.png"],
        "val": ["20051020_43804_0100_PP.png", "20051020_43806_0100_PP.png"],
    },
    "csv": {"test": ["img_0.png", "img_2.png"], "val": ["img_4.png", "img_6.png"]},
}
APTOS_30_BEFORE = {
    "test": ["1a2b3c000002", "1a2b3c000003", "1a2b3c00000a", "1a2b3c00000f", "1a2b3c000017",
             "1a2b3c00001d"],
    "val": ["1a2b3c000004", "1a2b3c000008", "1a2b3c000011", "1a2b3c000012", "1a2b3c00001b"],
}  # fmt: skip
EYEPACS_20_PATIENTS_BEFORE = {"test": {"12", "17", "19", "22"}, "val": {"13", "16", "26"}}


def _drawn(make_cfg, dataset: str, root: Path, *overrides: str) -> dict[str, list[str]]:
    """Keys (without the source name) per split, as the configured datamodule draws them."""
    dm = instantiate(make_cfg(f"data={dataset}", f"data.root={root}", *overrides).data)
    dm.prepare_data()
    dm.setup("fit")
    return {s: [r.key.split("/", 1)[1] for r in rs] for s, rs in dm.splits.items()}


def test_default_splits_are_the_ones_drawn_before_the_move(tmp_path, make_cfg):
    """Uneven sets where the seeded permutation decides: the same images as the old hold-out."""
    aptos = make_aptos(tmp_path / "aptos", [g for g in range(5) for _ in range(6)])
    drawn = _drawn(make_cfg, "aptos", aptos)
    assert {s: drawn[s] for s in ("test", "val")} == APTOS_30_BEFORE
    grades = [g for g in range(5) for _ in range(8)]
    eyepacs = make_eyepacs(tmp_path / "eyepacs", grades, both_eyes=True)
    drawn = _drawn(make_cfg, "eyepacs", eyepacs)
    patients = {s: {k.split("_")[0] for k in drawn[s]} for s in ("test", "val")}
    assert patients == EYEPACS_20_PATIENTS_BEFORE


def test_reshuffling_validation_keeps_the_test_images(tmp_path, make_cfg):
    root = make_aptos(tmp_path / "aptos", [g for g in range(5) for _ in range(6)])
    default = _drawn(make_cfg, "aptos", root)
    other_val = _drawn(make_cfg, "aptos", root, "data.split_seed=1")
    assert other_val["test"] == default["test"] and other_val["val"] != default["val"]
    other_test = _drawn(make_cfg, "aptos", root, "data.test_split_seed=1")
    assert other_test["test"] != default["test"]


def test_old_checkpoints_source_split_seed_is_the_test_split_seed(tmp_path, make_cfg, caplog):
    """Configs stored before data.test_split_seed name it data.source.split_seed: same test set."""
    root = make_aptos(tmp_path / "aptos", [g for g in range(5) for _ in range(6)])
    with caplog.at_level(logging.WARNING):
        old = _drawn(make_cfg, "aptos", root, "+data.source.split_seed=3")
    assert old == _drawn(make_cfg, "aptos", root, "data.test_split_seed=3")
    assert "data.source.split_seed=3 is now data.test_split_seed" in caplog.text


@pytest.mark.slow
def test_combined_idrid_and_aptos_train_with_missing_labels(tmp_path, make_cfg):
    """IDRiD (DR + DME) with APTOS (DR only) through a real training run, metrics per source."""
    rows = [(f"IDRiD_{i:03d}", str(i % 5), str(0 if i % 5 < 2 else i % 3)) for i in range(1, 21)]
    make_idrid(tmp_path / "idrid", rows, rows[:8])
    make_aptos(tmp_path / "aptos")
    cfg = make_cfg(
        "data=combined",
        f"data.source.sources.idrid.root={tmp_path / 'idrid'}",
        f"data.source.sources.aptos.root={tmp_path / 'aptos'}",
        "trainer.max_epochs=1",
        "logger=none",
    )
    metrics = train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["data"]["num_val"] >= 2
    for source in ("idrid", "aptos"):
        assert f"test/{source}/acc_dr" in summary["test"]
        assert f"val/{source}/acc_dr" in summary["best"]
    assert summary["test"]["test/aptos/acc_dme"] is None  # APTOS has no DME grades
    assert summary["test"]["test/idrid/acc_dme"] is not None
    test = summary["test"]
    assert test["test/idrid/num_dr"] + test["test/aptos/num_dr"] == test["test/num_dr"]
    assert test["test/aptos/num_dme"] == 0 and test["test/idrid/num_dme"] == test["test/num_dme"]
    assert 0.0 <= metrics["val/avg_acc"] <= 1.0


@pytest.mark.slow
def test_dr_only_training_leaves_sigma_dme_at_its_initial_value(tmp_path, make_cfg):
    """A real run on APTOS (no DME grades): the DME log-variance is never pushed anywhere."""
    make_aptos(tmp_path / "aptos", [g for g in range(5) for _ in range(6)])
    cfg = make_cfg(
        "data=aptos", f"data.root={tmp_path / 'aptos'}", "trainer.max_epochs=2",
        "unfreeze_step=0", "logger=none", "test=false",
    )  # fmt: skip
    train(cfg)
    with open(Path(cfg.paths.output_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["loss/sigma_dme"]) for r in rows] == [1.0, 1.0]
    assert all(float(r["loss/sigma_dr"]) != 1.0 for r in rows)  # the graded task did move


def test_skipping_a_bad_image_leaves_the_test_split_alone(tmp_path, make_cfg):
    """The test hold-out is drawn from every listed image, before undecodable ones are dropped."""
    grades = [g for g in range(5) for _ in range(6)]
    intact = make_aptos(tmp_path / "intact", grades)
    broken = make_aptos(tmp_path / "broken", grades)
    bad = sorted((broken / "train_images").glob("*.png"))[3]
    bad.write_bytes(b"not an image")

    def test_keys(root: Path) -> list[str]:
        overrides = ("data=aptos", f"data.root={root}", "data.on_bad_image=skip")
        dm = instantiate(make_cfg(*overrides).data)
        dm.prepare_data()
        dm.setup("fit")
        return [r.key.split("/", 1)[1] for r in dm.splits["test"]]

    expected = [k for k in test_keys(intact) if k != bad.stem]
    assert test_keys(broken) == expected
