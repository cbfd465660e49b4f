"""Temperature scaling: the fit, its storage in best.ckpt, and its use by predict."""

from __future__ import annotations

import json

import pytest
import torch

from visioncare.errors import ConfigurationError
from visioncare.scoring.calibration import (
    CHECKPOINT_KEY,
    apply_temperature,
    check_method,
    checkpoint_entry,
    fit_calibration,
    fit_temperature,
    nll,
    store_calibration,
    temperatures_from,
)
from visioncare.serving.loading import input_spec, load_model
from visioncare.serving.predictor import predict_paths
from visioncare.tasks.train import run as train


def _overconfident(true_t: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits z whose labels are drawn from softmax(z / true_t): softmax(z) is miscalibrated."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 3.0
    labels = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1, generator=generator)
    return torch.softmax(logits, dim=1), labels.squeeze(1)


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    probs, labels = _overconfident(true_t)
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.05)


def test_calibrated_nll_is_not_worse_and_grades_do_not_change():
    probs, labels = _overconfident(2.5, n=4000)
    targets = {"dr": labels, "dme": labels.clamp_max(2)}
    record = fit_calibration({"dr": probs, "dme": probs[:, :3]}, targets, "temperature")
    for task in ("dr", "dme"):
        assert record["val_nll_after"][task] <= record["val_nll_before"][task]
        t = record["temperatures"][task]
        calibrated = apply_temperature(probs, t)
        assert torch.equal(calibrated.argmax(1), probs.argmax(1))
    assert record["val_nll_after"]["dr"] < record["val_nll_before"]["dr"] - 0.05


def test_unlabelled_rows_are_ignored():
    probs, labels = _overconfident(2.0, n=2000)
    masked = labels.clone()
    masked[::2] = -1
    assert nll(probs, torch.full_like(labels, -1)) is None
    assert fit_temperature(probs, torch.full_like(labels, -1)) == 1.0
    assert nll(probs, masked) == pytest.approx(nll(probs[1::2], labels[1::2]))


def test_calibration_none_stores_no_temperature(tmp_path):
    probs, labels = _overconfident(2.0, n=500)
    record = fit_calibration({"dr": probs}, {"dr": labels}, "none")
    assert record["temperatures"] is None and checkpoint_entry(record) is None
    assert record["val_nll_after"] == record["val_nll_before"]
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"method": "temperature", "dr": 2.0}}, ckpt)
    store_calibration(ckpt, checkpoint_entry(record))
    assert CHECKPOINT_KEY not in torch.load(ckpt, weights_only=True)
    with pytest.raises(ConfigurationError, match="calibration=temperature"):
        check_method("platt")


def test_entry_round_trip():
    record = {"method": "temperature", "temperatures": {"dr": 1.5, "dme": 0.8}}
    entry = checkpoint_entry(record)
    assert entry == {"method": "temperature", "dr": 1.5, "dme": 0.8}
    assert temperatures_from(entry) == {"dr": 1.5, "dme": 0.8}
    assert temperatures_from(None) is None


@pytest.mark.slow
def test_training_stores_temperatures_and_predict_applies_them(tiny_checkpoint, synthetic_root):
    """best.ckpt carries the fitted temperatures; predict's probabilities are calibrated."""
    stored = torch.load(tiny_checkpoint, weights_only=True)[CHECKPOINT_KEY]
    assert stored["method"] == "temperature" and set(stored) == {"method", "dr", "dme"}
    summary = json.loads((tiny_checkpoint.parents[1] / "summary.json").read_text())
    record = summary["calibration"]
    assert record["temperatures"] == {"dr": stored["dr"], "dme": stored["dme"]}
    for task in ("dr", "dme"):
        assert record["val_nll_after"][task] <= record["val_nll_before"][task] + 1e-9
    model, _ = load_model(tiny_checkpoint)
    assert model.temperatures == {"dr": stored["dr"], "dme": stored["dme"]}
    photos = sorted(p for p in synthetic_root.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[
        :4
    ]
    spec = input_spec(model)
    calibrated = predict_paths(model, spec, photos)[0]
    temperatures, model.temperatures = model.temperatures, None
    raw = predict_paths(model, spec, photos)[0]
    for task, t in temperatures.items():
        torch.testing.assert_close(calibrated[task], apply_temperature(raw[task], t))


@pytest.mark.slow
def test_training_with_calibration_none_stores_no_temperature(make_cfg, tmp_path):
    cfg = make_cfg(
        "calibration=none", "trainer.max_epochs=1", "logger=none", "test=false", "gradcam_images=0"
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert CHECKPOINT_KEY not in torch.load(ckpt, weights_only=True)
    assert load_model(ckpt)[0].temperatures is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["calibration"]["method"] == "none"
    assert summary["calibration"]["temperatures"] is None


def test_a_model_at_chance_gets_a_capped_temperature():
    """Confident outputs unrelated to the labels drive T to infinity; it stops at the bound, so
    float32 probabilities never tie and the predicted grade never changes."""
    from visioncare.scoring.calibration import TEMPERATURE_RANGE, apply_temperature, fit_temperature

    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(4 * torch.randn(400, 5, generator=generator), dim=1)
    labels = torch.randint(0, 5, (400,), generator=generator)
    temperature = fit_temperature(probs, labels)
    assert temperature == TEMPERATURE_RANGE[1]
    assert torch.equal(apply_temperature(probs, temperature).argmax(1), probs.argmax(1))
