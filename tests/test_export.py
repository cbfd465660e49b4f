"""Export (`src/export.py`): ONNX parity with PyTorch, safetensors reload, preprocessing.json."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from tests.conftest import CONF, ROOT, predict_cfg
from visioncare.data.fundus import LOCALISATION_VERSION
from visioncare.errors import ConfigurationError
from visioncare.models.net import TwoHeadNet
from visioncare.serving.loading import load_model, load_onnx
from visioncare.serving.onnx_export import (
    OUTPUT_NAMES,
    ExportMismatchError,
    _plain_net,
    check_onnx,
    export_onnx,
)
from visioncare.tasks.export import run as export
from visioncare.tasks.predict import run as run_predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> tuple[Path, Path, dict]:
    """The shared tiny checkpoint exported once for the module: (checkpoint, export dir, result)."""
    out = tmp_path_factory.mktemp("export") / "x"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        export_cfg = compose(
            config_name="export",
            overrides=[f"ckpt_path={tiny_checkpoint}", f"output_dir={out}"],
        )
    GlobalHydra.instance().clear()
    return tiny_checkpoint, out, export(export_cfg)


@pytest.mark.slow
def test_export_writes_all_files(exported):
    _, out, result = exported
    for name in ("model.onnx", "model.safetensors", "preprocessing.json"):
        assert (out / name).is_file(), name
    assert result["onnx_max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_matches_pytorch(exported, batch):
    ckpt, out, _ = exported
    model, _ = load_model(ckpt)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    dr, dme = session.run(OUTPUT_NAMES, {"image": images.numpy()})
    assert dr.shape == (batch, 5) and dme.shape == (batch, 3)
    with torch.no_grad():
        expected = model(images)
    assert np.abs(dr - expected["dr"].numpy()).max() < 1e-4
    assert np.abs(dme - expected["dme"].numpy()).max() < 1e-4


@pytest.mark.slow
def test_safetensors_reload_into_a_fresh_net(exported):
    ckpt, out, _ = exported
    model, _ = load_model(ckpt)
    info = json.loads((out / "preprocessing.json").read_text())
    fresh = TwoHeadNet(backbone=info["backbone"], pretrained=False).eval()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    reference = model.net.to(memory_format=torch.contiguous_format)  # same conv kernels as fresh
    for name, tensor in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got, expected = fresh(images), reference(images)
    for task in ("dr", "dme"):
        assert torch.equal(got[task], expected[task])


@pytest.mark.slow
def test_preprocessing_json(exported):
    ckpt, out, _ = exported
    info = json.loads((out / "preprocessing.json").read_text())
    # The validation operating point travels with the exported model (predict's referable_dr).
    stored = torch.load(ckpt, weights_only=True)["visioncare_operating_points"]
    assert info["operating_points"] == stored and "dr" in stored
    # So do the calibration temperatures (the ONNX path applies them like the checkpoint's).
    calibration = torch.load(ckpt, weights_only=True)["visioncare_calibration"]
    assert info["temperatures"] == {"dr": calibration["dr"], "dme": calibration["dme"]}
    # The model card travels too, generated from the training run's records.
    card = (out / "model_card.md").read_text()
    summary = json.loads((ckpt.parents[1] / "summary.json").read_text())
    assert summary["reproducibility"]["git_commit"] in card and "not a medical device" in card
    assert info["image_size"] == 64 and len(info["mean"]) == 3 and len(info["std"]) == 3
    assert info["preprocess"]["size"] == 72
    # The crop is recorded: which localisation algorithm, and in words what it does.
    assert info["preprocess"]["localisation"] == LOCALISATION_VERSION
    assert "circle" in info["fundus_crop"]
    assert info["class_names"] == {
        "dr": [f"DR {k}" for k in range(5)], "dme": [f"DME {k}" for k in range(3)],
    }  # fmt: skip
    assert info["output_names"] == ["dr_logits", "dme_logits"] and info["input_name"] == "image"


@pytest.mark.slow
def test_cli_reports_the_difference(exported, tmp_path):
    ckpt, _, _ = exported
    command = [
        sys.executable, "src/export.py", f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'cli'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "max abs difference" in done.stdout + done.stderr
    assert (tmp_path / "cli" / "model.onnx").is_file()


@pytest.mark.slow
def test_a_wrong_graph_fails_the_check(exported, tmp_path):
    """The check must catch a graph that is not the network (here: other weights)."""
    ckpt, _, _ = exported
    model, _ = load_model(ckpt)
    net = _plain_net(model.net)
    export_onnx(net, tmp_path / "m.onnx", image_size=64)
    with torch.no_grad():
        net.heads["dr"][1].bias += 1.0
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        check_onnx(net, tmp_path / "m.onnx", image_size=64)


def _photos(synthetic_root: Path, count: int = 4) -> list[Path]:
    images = sorted(p for p in synthetic_root.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(images) >= count
    return images[:count]


def _probabilities(csv_path: Path) -> np.ndarray:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if "_prob_" in c]
    return np.array([[float(row[c]) for c in columns] for row in rows])


@pytest.mark.slow
def test_predict_with_the_onnx_export_matches_the_checkpoint(exported, synthetic_root, tmp_path):
    """predict.py takes model.onnx (+ preprocessing.json) and agrees with the checkpoint."""
    ckpt, out, _ = exported
    photos = _photos(synthetic_root)
    listing = tmp_path / "list.csv"
    listing.write_text("image\n" + "".join(f"{p}\n" for p in photos))
    from_ckpt = run_predict(predict_cfg(tmp_path / "ckpt", ckpt, listing))
    from_onnx = run_predict(predict_cfg(tmp_path / "onnx", out / "model.onnx", listing))
    expected = _probabilities(Path(from_ckpt["output"]))
    got = _probabilities(Path(from_onnx["output"]))
    assert got.shape == (len(photos), 8)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_onnx_predict_needs_preprocessing_json_and_refuses_gradcam(
    exported, synthetic_root, tmp_path
):
    _, out, _ = exported
    photos = _photos(synthetic_root, 1)
    with pytest.raises(ConfigurationError, match="explain=true needs the PyTorch checkpoint"):
        run_predict(predict_cfg(tmp_path, out / "model.onnx", photos[0], "explain=true"))
    lonely = tmp_path / "alone" / "model.onnx"
    lonely.parent.mkdir()
    shutil.copy(out / "model.onnx", lonely)
    with pytest.raises(ConfigurationError, match=r"preprocessing\.json is missing"):
        run_predict(predict_cfg(tmp_path, lonely, photos[0]))


@pytest.mark.slow
def test_an_onnx_file_that_is_not_a_visioncare_export_is_refused(exported, tmp_path):
    _, out, _ = exported
    stranger = tmp_path / "model.onnx"
    torch.onnx.export(
        torch.nn.Conv2d(3, 2, 3).eval(),
        (torch.randn(1, 3, 8, 8),),
        str(stranger),
        input_names=["image"],
        output_names=["y"],
        dynamo=False,
    )
    shutil.copy(out / "preprocessing.json", tmp_path / "preprocessing.json")
    with pytest.raises(ConfigurationError, match="not a VisionCare export"):
        load_onnx(stranger)
