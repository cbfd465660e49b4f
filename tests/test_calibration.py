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


@pytest.mark.slow
def test_stored_threshold_is_chosen_on_calibrated_validation_probabilities(
    tiny_checkpoint, cache_dir, tmp_path
):
    """The operating point in best.ckpt is the one the calibrated validation scores give, which
    is what eval and predict compare with it (raw scores would give another threshold)."""
    import csv

    from tests.conftest import compose_run
    from visioncare.scoring.referral import operating_points
    from visioncare.tasks.evaluate import run as evaluate

    overrides = [
        f"ckpt_path={tiny_checkpoint}", "split=val", f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={tmp_path / 'logs'}", "num_workers=0", "bootstrap.resamples=10",
    ]  # fmt: skip
    evaluate(compose_run("eval", overrides, tmp_path / "run"))
    # eval's plots reach TensorBoard too (an event file in its run directory).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/reliability_dr", "val/reliability_dme", "val/confusion_dr"} <= set(
        events.Tags()["images"]
    )
    with open(tmp_path / "run" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    def probs(task: str, classes: int, suffix: str) -> torch.Tensor:
        columns = [f"{task}_prob_{k}{suffix}" for k in range(classes)]
        return torch.tensor([[float(r[c]) for c in columns] for r in rows], dtype=torch.float64)

    targets = {t: torch.tensor([int(float(r[f"{t}_true"])) for r in rows]) for t in ("dr", "dme")}
    calibrated = {"dr": probs("dr", 5, ""), "dme": probs("dme", 3, "")}
    raw = {"dr": probs("dr", 5, "_uncalibrated"), "dme": probs("dme", 3, "_uncalibrated")}
    stored = torch.load(tiny_checkpoint, weights_only=True)["visioncare_operating_points"]
    target = next(iter(stored.values()))["target_sensitivity"]
    from_calibrated = operating_points(calibrated, targets, target)
    from_raw = operating_points(raw, targets, target)
    assert stored and set(stored) == set(from_calibrated)
    for task, point in stored.items():
        # predictions.csv rounds to its printed precision.
        assert point["threshold"] == pytest.approx(from_calibrated[task]["threshold"], abs=1e-4)
        assert point["val_sensitivity"] == pytest.approx(from_calibrated[task]["val_sensitivity"])
    # The check has teeth: the temperature moved the scores, so the raw threshold is another.
    assert any(abs(stored[t]["threshold"] - from_raw[t]["threshold"]) > 1e-3 for t in stored)
