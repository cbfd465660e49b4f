"""model_card.md: generated from the run's own records (numbers, provenance, commit)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from visioncare.runs.model_card import FILENAME


def _table_values(card: str) -> dict[str, str]:
    """`| metric | value |` rows of the card, parsed back."""
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card, flags=re.MULTILINE))


@pytest.mark.slow
def test_training_card_carries_the_runs_numbers(tiny_checkpoint):
    run_dir = tiny_checkpoint.parents[1]
    card = (run_dir / FILENAME).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    values = _table_values(card)
    for key, value in summary["best"].items():
        if key != "epoch" and isinstance(value, float):
            assert float(values[key]) == pytest.approx(value, abs=1e-4)
    for task, temperature in summary["calibration"]["temperatures"].items():
        assert float(values[f"{task}/temperature"]) == pytest.approx(temperature, abs=1e-4)
        after = summary["calibration"]["val_nll_after"][task]
        assert float(values[f"{task}/val_nll_after"]) == pytest.approx(after, abs=1e-4)
    points = torch.load(tiny_checkpoint, weights_only=True)["visioncare_operating_points"]
    for task, point in points.items():
        assert float(values[f"{task}/threshold"]) == pytest.approx(point["threshold"], abs=1e-4)
    provenance = json.dumps(summary["model"]["weights"], sort_keys=True)
    assert provenance in card
    assert summary["reproducibility"]["git_commit"] in card
    assert "not a medical device" in card and "synthetic" in card.lower()
    sizes = summary["data"]
    assert f"train = {sizes['num_train']}" in card or f"num_train = {sizes['num_train']}" in card
    assert "python src/train.py" in card
