"""Subgroups the data names (`data.group_columns`, the DICOM camera) and external validation's
building blocks: parsing, the missing-column error, and metrics re-computed from
predictions.csv rows of one group / one dataset."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF
from visioncare.cli import user_error_message
from visioncare.data.records import Record, with_dicom_identity
from visioncare.data.sources.csv_table import CSVTableSource, parse_group_columns
from visioncare.errors import ConfigurationError, DataValidationError
from visioncare.scoring.bootstrap import difference_intervals, outcomes_from_probs, point_metrics
from visioncare.scoring.report import (
    EvaluatedSplit,
    subgroup_metrics,
    validation_section,
    write_split_predictions,
)
from visioncare.tasks.evaluate import _Evaluated, external_datasets, validation_rows

TASKS = {"dr": 5, "dme": 3}


# ------------------------------------------------------------------ group column parsing
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ([], ()),
        ("", ()),
        ("site", ("site",)),
        (" site , camera_model", ("site", "camera_model")),
        (["site", " eye_side "], ("site", "eye_side")),
    ],
)
def test_group_columns_are_parsed(value, expected):
    assert parse_group_columns(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (["site", "site"], "twice"),
        (["a/b"], "'/' or '='"),
        (["source"], "builds itself"),
        (["camera"], "builds itself"),
        (["site", ""], "non-empty"),
    ],
)
def test_bad_group_columns_are_configuration_errors(value, match):
    with pytest.raises(ConfigurationError, match=match):
        parse_group_columns(value)


def _table(root: Path, header: str = "image,dr,dme,site") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"img{i}.png,{i % 5},{i % 3},{'' if i == 3 else 'AB'[i % 2]}" for i in range(6)]
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    for i in range(6):
        (root / f"img{i}.png").write_bytes(b"")
    return root / "labels.csv"


def test_group_columns_are_carried_into_records(tmp_path):
    _table(tmp_path)
    source = CSVTableSource(tmp_path, "labels.csv", group_columns=["site"])
    records = sorted(source.load()["train"], key=lambda r: r.key)
    assert [dict(r.groups)["site"] for r in records] == ["A", "B", "A", "unknown", "A", "B"]
    # Without group_columns the records carry none, as before.
    assert all(not r.groups for r in CSVTableSource(tmp_path, "labels.csv").load()["train"])


def test_missing_group_column_is_one_error_line_naming_file_and_column(tmp_path):
    table = _table(tmp_path)
    with pytest.raises(DataValidationError) as caught:  # at construction: before any work
        CSVTableSource(tmp_path, "labels.csv", group_columns=["site", "clinic"])
    message = user_error_message(caught.value)
    assert message is not None and "\n" not in message
    assert str(table) in message and "'clinic'" in message and "data.group_columns" in message


def test_dicom_camera_becomes_a_group(tmp_path):
    import pydicom
    from skimage import data

    from tests.test_dicom import write_dicom

    path = write_dicom(tmp_path / "a.dcm", data.retina()[:64, :64].copy())
    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.ManufacturerModelName = "Topcon", "TRC-NW400"
    ds.save_as(path)
    bare = write_dicom(tmp_path / "b.dcm", data.retina()[:64, :64].copy())
    records = [Record(p, 1, 0, "csv", p.name) for p in (path, bare)]
    found = with_dicom_identity(records)
    assert dict(found[0].groups)["camera"] == "Topcon TRC-NW400"
    assert dict(found[1].groups)["camera"] == "unknown"
    assert found[0].laterality == "R"  # written by write_dicom


# ------------------------------------------------------------------ metrics from the CSV
def _random_split(n: int, seed: int, sites: list[str]) -> EvaluatedSplit:
    rng = np.random.default_rng(seed)
    probs = {
        t: torch.softmax(torch.tensor(rng.normal(0, 2, (n, c))), 1).float()
        for t, c in TASKS.items()
    }
    targets = {t: torch.tensor(rng.integers(0, c, n)) for t, c in TASKS.items()}
    records = [
        Record(Path(f"/x/{i}.png"), 0, 0, "csv", f"csv/{i}", groups=(("site", sites[i % 3]),))
        for i in range(n)
    ]
    return EvaluatedSplit(f"set{seed}", records, probs, targets, probs)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _by_hand(rows: list[dict[str, str]], threshold: float) -> dict[str, float]:
    """acc, QWK, referable sensitivity and ECE of DR, recomputed from CSV rows with numpy."""
    y = np.array([int(r["dr_true"]) for r in rows])
    probs = np.array([[float(r[f"dr_prob_{k}"]) for k in range(5)] for r in rows])
    p = probs.argmax(1)
    m = np.zeros((5, 5))
    np.add.at(m, (y, p), 1)
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    w = (i - j) ** 2 / 16
    qwk = 1 - (w * m).sum() / (w * np.outer(m.sum(1), m.sum(0)) / m.sum()).sum()
    truth = y >= 2
    decision = probs[:, 2:].sum(1) >= threshold
    confidence = probs.max(1)
    bins = np.minimum((confidence * 15).astype(int), 15)
    ece = sum(
        abs((p == y)[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
        for b in range(16)
        if (bins == b).any()
    )
    return {
        "acc_dr": float((p == y).mean()),
        "qwk_dr": float(qwk),
        "referable_dr_sensitivity": float(decision[truth].mean()),
        "ece_dr": float(ece),
    }


def test_subgroup_metrics_equal_recomputation_from_predictions_csv(tmp_path):
    part = _random_split(90, 0, ["north", "south", "tiny"])
    # "tiny" is made small: 4 of its 30 rows stay, the rest move to "north".
    records = list(part.records)
    for index in range(2, 90, 3)[4:]:
        records[index] = Record(
            records[index].image, 0, 0, "csv", records[index].key, groups=(("site", "north"),)
        )
    part = EvaluatedSplit(part.dataset, records, part.probs, part.targets, part.probs)
    thresholds = {"dr": 0.4, "dme": 0.5}
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in part.probs.items()},
        {t: v.numpy() for t, v in part.targets.items()},
        thresholds,
    )
    metrics = subgroup_metrics(outcomes, records, "test", min_size=10, resamples=50, seed=0)
    write_split_predictions(tmp_path / "predictions.csv", [part])
    rows = _read(tmp_path / "predictions.csv")
    assert {r["dataset"] for r in rows} == {"set0"} and "site" in rows[0]
    for site in ("north", "south"):
        mine = [r for r in rows if r["site"] == site]
        prefix = f"test/group/site={site}"
        assert metrics[f"{prefix}/num"] == len(mine)
        for name, value in _by_hand(mine, thresholds["dr"]).items():
            assert metrics[f"{prefix}/{name}"] == pytest.approx(value, abs=1e-6), name
            low, high = metrics[f"{prefix}/{name}_ci_low"], metrics[f"{prefix}/{name}_ci_high"]
            assert low - 1e-9 <= value <= high + 1e-9
    # Below min_size: the count alone (configurable: min_size=1 gives it metrics).
    assert metrics["test/group/site=tiny/num"] == 4
    assert "test/group/site=tiny/acc_dr" not in metrics
    again = subgroup_metrics(outcomes, records, "test", min_size=1, resamples=5, seed=0)
    assert "test/group/site=tiny/acc_dr" in again


def test_difference_is_unpaired_and_its_point_is_the_difference_of_points():
    a, b = _random_split(60, 1, ["x"] * 3), _random_split(40, 2, ["x"] * 3)
    thresholds = {"dr": 0.5, "dme": 0.5}

    def outcomes(part):
        return outcomes_from_probs(
            {t: p.numpy() for t, p in part.probs.items()},
            {t: v.numpy() for t, v in part.targets.items()},
            thresholds,
        )

    oa, ob = outcomes(a), outcomes(b)
    diff = difference_intervals((oa, None), (ob, None), resamples=200, seed=0)
    pa, pb = point_metrics(oa), point_metrics(ob)
    for name in ("acc_dr", "qwk_dr", "referable_dr_auroc"):
        point, low, high = diff[name]
        assert point == pytest.approx(pb[name] - pa[name])
        assert low < point < high
    lines = validation_section(
        {"t/acc_dr": 0.5, "t/acc_dr_ci_low": 0.4, "t/acc_dr_ci_high": 0.6},
        [("own", "t", 60), ("small", "s", 3)],
        [("small − own", "d")],
        "note",
    )
    assert "| own | 60 | 0.5000 [0.4000, 0.6000] |" in "\n".join(lines)
    assert any(line.startswith("| small | 3 | (too few images)") for line in lines)


# ------------------------------------------------------------------ the datasets interface
def _eval_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt_path=x.ckpt", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def test_datasets_compose_from_data_configs_with_their_own_overrides():
    cfg = _eval_cfg(
        "+data@datasets.hard=synthetic",
        "datasets.hard.difficulty=hard",
        "+data@datasets.clinic=csv",
        "datasets.clinic.group_columns=[site]",
    )
    found = external_datasets(cfg)
    assert list(found) == ["hard", "clinic"]
    assert found["hard"].difficulty == "hard" and list(found["clinic"].group_columns) == ["site"]
    assert cfg.get("data") is None  # the checkpoint's own data stays the reference row
    assert external_datasets(_eval_cfg()) == {}


@pytest.mark.parametrize("name", ["test", "own"])
def test_reserved_dataset_names_are_refused(name):
    with pytest.raises(ConfigurationError, match=f"datasets.{name}"):
        external_datasets(_eval_cfg(f"+data@datasets.{name}=synthetic"))


def test_a_dataset_that_is_not_a_data_config_is_refused():
    with pytest.raises(ConfigurationError, match=r"\+data@datasets.x="):
        external_datasets(_eval_cfg("+datasets.x.root=/tmp"))


def test_a_multi_source_dataset_gets_a_row_per_source():
    """data=combined: the validation table lists each source (its `source` subgroup)."""
    sources = ["idrid", "aptos"]
    records = [Record(Path(f"{i}.png"), 0, 0, sources[i % 2], str(i)) for i in range(30)]
    evaluated = _Evaluated({}, EvaluatedSplit("own", records, {}, {}), None, {})
    metrics = {"test/group/source=aptos/num": 15, "test/group/source=idrid/num": 15}
    rows = validation_rows(metrics, evaluated, "test")
    assert rows == [
        ("own", "test", 30),
        ("own: aptos", "test/group/source=aptos", 15),
        ("own: idrid", "test/group/source=idrid", 15),
    ]
