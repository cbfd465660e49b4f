"""Batch prediction (`src/predict.py`): inputs, error rows, probabilities, explain=true."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from tests.conftest import predict_cfg
from tests.test_dicom import write_dicom
from visioncare.errors import ConfigurationError
from visioncare.scoring.calibration import apply_temperature
from visioncare.serving.loading import ImagePreprocessor, input_spec, load_model
from visioncare.serving.predictor import csv_columns
from visioncare.tasks.predict import run as run_predict

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, synthetic_root) -> tuple[Path, list[Path]]:
    """One tiny checkpoint for the module, and a few test images of the synthetic set."""
    images = sorted(
        p for p in Path(synthetic_root).rglob("*") if p.suffix.lower() in (".jpg", ".png")
    )
    assert len(images) >= NUM_IMAGES
    return tiny_checkpoint, images[:NUM_IMAGES]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == csv_columns()
        return list(reader)


def _folder(tmp_path: Path, images: list[Path]) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        target = folder / ("sub" if i % 2 else "") / f"img{i}{image.suffix.upper()}"
        shutil.copy(image, target)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_folder_input_with_corrupt_file(tmp_path, trained):
    ckpt, images = trained
    folder = _folder(tmp_path, images)
    result = run_predict(predict_cfg(tmp_path, ckpt, folder))
    rows = _read(Path(result["output"]))
    assert Path(result["output"]) == tmp_path / "run" / "predictions.csv"
    assert len(rows) == NUM_IMAGES + 1  # .txt skipped, corrupt file kept with its error
    broken = [r for r in rows if r["image"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["dr_grade"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == NUM_IMAGES
    # referable_dr applies the operating point chosen on validation and stored in the checkpoint.
    points = torch.load(ckpt, weights_only=True)["visioncare_operating_points"]
    threshold = points["dr"]["threshold"]
    for row in good:
        dr = [float(row[f"dr_prob_{k}"]) for k in range(5)]
        dme = [float(row[f"dme_prob_{k}"]) for k in range(3)]
        assert sum(dr) == pytest.approx(1, abs=1e-4) and sum(dme) == pytest.approx(1, abs=1e-4)
        assert int(row["dr_grade"]) == max(range(5), key=dr.__getitem__)
        assert int(row["dme_grade"]) == max(range(3), key=dme.__getitem__)
        assert int(row["referable_dr"]) == int(sum(dr[2:]) >= threshold - 1e-6)


@pytest.mark.slow
def test_glob_and_csv_inputs(tmp_path, trained):
    ckpt, images = trained
    folder = _folder(tmp_path, images)
    result = run_predict(predict_cfg(tmp_path, ckpt, f"{folder}/sub/*.*", "output=glob.csv"))
    rows = _read(Path(result["output"]))
    assert len(rows) == NUM_IMAGES // 2 and not any(r["error"] for r in rows)

    listing = folder / "list.csv"
    listing.write_text("image,note\nimg0" + images[0].suffix.upper() + ",a\nsub/img1"
                       + images[1].suffix.upper() + ",b\n")  # fmt: skip
    result = run_predict(
        predict_cfg(tmp_path, ckpt, listing, f"output={tmp_path / 'out' / 'csv.csv'}")
    )
    rows = _read(tmp_path / "out" / "csv.csv")
    assert [Path(r["image"]).name for r in rows] == [
        f"img0{images[0].suffix.upper()}", f"img1{images[1].suffix.upper()}",
    ]  # fmt: skip
    assert not any(r["error"] for r in rows)

    with pytest.raises(ConfigurationError, match="nothing-here"):
        run_predict(predict_cfg(tmp_path, ckpt, tmp_path / "nothing-here" / "*.jpg"))


@pytest.mark.slow
def test_predictions_match_the_models_forward(tmp_path, trained):
    ckpt, images = trained
    folder = tmp_path / "copies"
    folder.mkdir()
    copies = [
        Path(shutil.copy(image, folder / f"{i}_{image.name}")) for i, image in enumerate(images)
    ]
    result = run_predict(predict_cfg(tmp_path, ckpt, folder, "batch_size=3"))
    rows = {Path(r["image"]).name: r for r in _read(Path(result["output"]))}
    model, _ = load_model(ckpt)
    preprocessor = ImagePreprocessor(input_spec(model))
    for image in copies:
        with torch.no_grad():
            logits = model(preprocessor(image)[None])
        row = rows[image.name]
        for task, n in (("dr", 5), ("dme", 3)):
            # The forward's softmax with the checkpoint's stored temperature (what predict writes).
            temperature = (model.temperatures or {}).get(task, 1.0)
            expected = apply_temperature(logits[task].softmax(dim=1), temperature)[0]
            got = torch.tensor([float(row[f"{task}_prob_{k}"]) for k in range(n)])
            assert torch.allclose(got, expected, atol=1e-5)
            assert int(row[f"{task}_grade"]) == int(expected.argmax())


@pytest.mark.slow
def test_explain_overlays_the_cropped_fundus(tmp_path, trained):
    """Overlays are the fundus square (explain_size px), black outside the field."""
    ckpt, images = trained
    folder = tmp_path / "two"
    folder.mkdir()
    for image in images[:2]:
        shutil.copy(image, folder / image.name)
    run_predict(predict_cfg(tmp_path, ckpt, folder, "explain=true", "explain_size=160"))
    for image in images[:2]:
        for task in ("dr", "dme"):
            overlay = cv2.imread(str(tmp_path / "run" / "gradcam" / f"{image.stem}_{task}.png"))
            assert overlay is not None and overlay.shape == (160, 160, 3)
            corners = overlay[[0, 0, -1, -1], [0, -1, 0, -1]]
            assert not corners.any()  # outside the circle: black, no heat colours
            assert overlay[80, 80].any()  # the centre of the field is drawn


@pytest.mark.slow
def test_folder_mixing_dicom_jpeg_png_predicts_each(tmp_path, trained):
    """A clinic's export folder: one row per photo, errors only for the broken files, and a
    quality flag per photo (a darkened copy is flagged, the prediction is still made)."""
    ckpt, _ = trained
    photo = cv2.resize(data.retina(), (300, 300), interpolation=cv2.INTER_AREA)
    folder = tmp_path / "clinic"
    folder.mkdir()
    import pydicom

    camera = pydicom.dcmread(write_dicom(folder / "op_rgb.dcm", photo))
    camera.Manufacturer, camera.ManufacturerModelName = "Topcon", "TRC-NW400"
    camera.save_as(folder / "op_rgb.dcm")
    write_dicom(folder / "no_image.dcm", None)
    cv2.imwrite(str(folder / "photo.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    dark = (photo * 0.15).astype(np.uint8)
    cv2.imwrite(str(folder / "dark.png"), cv2.cvtColor(dark, cv2.COLOR_RGB2BGR))
    (folder / "cut.jpg").write_bytes((folder / "photo.jpg").read_bytes()[:500])
    result = run_predict(predict_cfg(tmp_path, ckpt, folder))
    rows = {Path(r["image"]).name: r for r in _read(Path(result["output"]))}
    assert sorted(rows) == ["cut.jpg", "dark.png", "no_image.dcm", "op_rgb.dcm", "photo.jpg"]
    assert "without pixel data" in rows["no_image.dcm"]["error"]
    assert "truncated" in rows["cut.jpg"]["error"]
    for name in ("op_rgb.dcm", "photo.jpg", "dark.png"):
        assert rows[name]["error"] == "" and rows[name]["dr_grade"] != "", name
    assert rows["op_rgb.dcm"]["quality"] == "ok" and rows["photo.jpg"]["quality"] == "ok"
    assert rows["dark.png"]["quality"] == "too_dark"
    assert rows["no_image.dcm"]["quality"] == ""
    # The gradable rule (`data.quality.is_gradable`): a too-dark photo's grade is not trusted.
    assert rows["op_rgb.dcm"]["gradable"] == "true" and rows["photo.jpg"]["gradable"] == "true"
    assert rows["dark.png"]["gradable"] == "false"
    assert rows["no_image.dcm"]["gradable"] == ""
    # The camera from the DICOM header (a subgroup column); other files do not name one.
    assert rows["op_rgb.dcm"]["camera"] == "Topcon TRC-NW400"
    assert rows["no_image.dcm"]["camera"] == "unknown" and rows["photo.jpg"]["camera"] == ""
