"""`python src/preprocess.py`: what the network sees, per photo, with the located circle."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from skimage import data

from tests.conftest import CONF, ROOT
from tests.test_dicom import write_dicom
from visioncare.tasks.preprocess import CROPS_COLUMNS
from visioncare.tasks.preprocess import run as run_preprocess


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple]]:
    """A folder of real-photo variants and each one's true circle (cx, cy, r) in its pixels."""
    folder = tmp_path_factory.mktemp("photos")
    photo = cv2.resize(data.retina(), (600, 600), interpolation=cv2.INTER_AREA)
    field = photo.max(axis=2) > 30
    ys, xs = np.nonzero(field)
    cx, cy, r = xs.mean() + 0.5, ys.mean() + 0.5, np.sqrt(field.sum() / np.pi)
    bgr = cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(folder / "clean.jpg"), bgr)
    barred = cv2.copyMakeBorder(bgr, 0, 0, 0, 80, cv2.BORDER_CONSTANT, value=0)
    barred[:, 620:660] = 255  # a ruler beside the field
    cv2.imwrite(str(folder / "bar.png"), barred)
    cut = bgr[70:-70]
    (folder / "sub").mkdir()
    cv2.imwrite(str(folder / "sub" / "clean.png"), cut)  # same stem as clean.jpg
    write_dicom(folder / "camera.dcm", photo)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    truth = {
        "clean.jpg": (cx, cy, r),
        "bar.png": (cx, cy, r),
        "clean.png": (cx, cy - 70, r),
        "camera.dcm": (cx, cy, r),
    }
    return folder, truth


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "crops.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CROPS_COLUMNS
        return {Path(row["image"]).name: row for row in reader}


@pytest.mark.slow
def test_cli_writes_crops_csv_pngs_and_contact_sheet(tmp_path, photos):
    folder, truth = photos
    out = tmp_path / "seen"
    command = [
        sys.executable, str(ROOT / "src" / "preprocess.py"), f"input={folder}",
        f"output_dir={out}", f"paths.log_dir={tmp_path / 'logs'}", "num_workers=2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert sorted(rows) == ["bar.png", "broken.jpg", "camera.dcm", "clean.jpg", "clean.png"]
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["center_x"] == ""
    for name, (cx, cy, r) in truth.items():
        row = rows[name]
        assert row["error"] == "" and row["quality"] == "ok", (name, row)
        assert row["gradable"] == "true", (name, row)
        assert float(row["radius"]) == pytest.approx(r, rel=0.03), name
        distance = np.hypot(float(row["center_x"]) - cx, float(row["center_y"]) - cy)
        assert distance <= 0.03 * r, name
    assert (rows["bar.png"]["width"], rows["bar.png"]["height"]) == ("680", "600")
    # One PNG per readable photo, at the network's input size; repeated stems do not collide.
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "contact_sheet.png")
    assert pngs == ["bar.png", "camera.png", "clean.png", "clean_2.png"]
    for name in pngs:
        image = cv2.imread(str(out / name))
        assert image.shape == (224, 224, 3)
        assert not image[[0, 0, -1, -1], [0, -1, 0, -1]].any()  # outside the field: black
    # The ruler changes nothing the network sees (clean.jpg differs by JPEG noise only).
    bar, clean = (cv2.imread(str(out / n)).astype(int) for n in ("bar.png", "clean.png"))
    assert np.abs(bar - clean).mean() < 3
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == 5 * 160


@pytest.mark.slow
def test_checkpoint_preprocessing_is_used(tmp_path, photos, tiny_checkpoint):
    folder, _ = photos
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="preprocess",
            overrides=[
                f"input={folder}/*.jpg", f"output_dir={tmp_path}", f"ckpt_path={tiny_checkpoint}",
                "image_size=999",  # ignored: the checkpoint's input size wins
            ],
        )  # fmt: skip
    GlobalHydra.instance().clear()
    result = run_preprocess(cfg)
    assert result["num_images"] == 2 and result["num_errors"] == 1
    assert cv2.imread(str(tmp_path / "clean.png")).shape == (64, 64, 3)
