"""EMA weights through Lightning's `EMAWeightAveraging` (`'callbacks=[default,ema]'`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visioncare.tasks.train import run as train

pytestmark = pytest.mark.slow


def test_ema_weights_differ_from_raw_and_are_the_ones_in_best_ckpt(make_cfg):
    # A low decay makes the average move visibly within the tiny run's few steps.
    cfg = make_cfg(
        "callbacks=[default,ema]",
        "callbacks.ema.decay=0.5",
        "unfreeze_step=0",
        "trainer.max_epochs=1",
        "logger=none",
        "test=false",
    )
    train(cfg)
    ckpt = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    floats = [k for k, v in raw.items() if v.is_floating_point()]
    assert any(not torch.equal(averaged[k], raw[k]) for k in floats)
