"""`splits.csv`: the record of a run's splits, and eval's check that the data did not change."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.conftest import CONF
from visioncare.data.records import Record
from visioncare.runs.splits import (
    FILENAME,
    check_splits,
    read_splits,
    splits_sha256,
    write_splits,
)
from visioncare.tasks.evaluate import run as evaluate


def _record(name: str, patient: str = "", dr: int = 0) -> Record:
    return Record(Path(f"/data/{name}.jpg"), dr, 0, "synthetic", name, patient, "L")


def _splits() -> dict[str, list[Record]]:
    return {
        "train": [_record("a", "p1"), _record("b", "p1"), _record("c", "p2")],
        "val": [_record("d", "p3")],
        "test": [_record("e", "p4"), _record("f")],
    }


@pytest.mark.slow
def test_training_run_writes_splits_csv_with_its_hash(tiny_checkpoint):
    run_dir = tiny_checkpoint.parents[1]
    rows = read_splits(run_dir / FILENAME)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["splits"]["sha256"] == splits_sha256(rows)
    assert list(rows[0]) == ["image", "source", "patient", "laterality", "split", "dr", "dme"]
    images = [row["image"] for row in rows]
    assert len(images) == len(set(images))  # every image once
    assert len(rows) == sum(summary["data"].values())
    split_of: dict[str, set[str]] = {}
    for row in rows:
        if row["patient"]:
            split_of.setdefault(f"{row['source']}/{row['patient']}", set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values())  # no patient in two splits


def test_unchanged_data_passes(tmp_path, caplog):
    write_splits(tmp_path, _splits())
    with caplog.at_level(logging.INFO, logger="visioncare"):
        assert check_splits(tmp_path, _splits()) == []
    assert "match" in caplog.text


def test_removed_and_added_images_are_named(tmp_path, caplog):
    write_splits(tmp_path, _splits())
    changed = _splits()
    changed["test"].pop()  # f removed
    changed["train"].append(_record("g", "p5"))  # g added
    with caplog.at_level(logging.WARNING, logger="visioncare"):
        changes = check_splits(tmp_path, changed)
    assert any("added" in c and "g.jpg" in c for c in changes)
    assert any("removed" in c and "f.jpg" in c for c in changes)
    assert "data changed since training" in caplog.text


def test_moved_and_relabelled_images_are_named(tmp_path):
    write_splits(tmp_path, _splits())
    changed = _splits()
    moved = changed["train"].pop()
    changed["val"].append(moved)
    changed["test"][0] = _record("e", "p4", dr=3)
    changes = check_splits(tmp_path, changed)
    assert any("moved" in c and "c.jpg" in c for c in changes)
    assert any("relabelled" in c and "e.jpg" in c for c in changes)


def test_run_without_splits_csv_is_not_checked(tmp_path):
    assert check_splits(tmp_path, _splits()) == []


@pytest.mark.slow
def test_eval_warns_when_the_data_changed_since_training(
    tiny_checkpoint, cache_dir, tmp_path, caplog
):
    """A run whose splits.csv lists an image the data no longer has, and lacks one it has."""
    run_dir = tmp_path / "train"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    shutil.copy(tiny_checkpoint, ckpt)
    rows = read_splits(tiny_checkpoint.parents[1] / FILENAME)
    dropped = rows.pop()  # on disk now, absent at training: "added"
    rows.append({**rows[0], "image": "/gone/photo.jpg"})  # at training, gone now: "removed"
    with (run_dir / FILENAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                f"ckpt_path={ckpt}",
                f"paths.cache_dir={cache_dir}",
                f"paths.log_dir={tmp_path / 'logs'}",
                "num_workers=0",
                "batch_size=8",
            ],
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    with caplog.at_level(logging.WARNING, logger="visioncare"):
        evaluate(cfg)
    assert "data changed since training" in caplog.text
    assert "/gone/photo.jpg" in caplog.text and Path(dropped["image"]).name in caplog.text
