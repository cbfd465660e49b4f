"""Rebuilding the model and its preprocessing from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from visioncare.data.datamodule import FundusDataModule
from visioncare.serving.loading import ImagePreprocessor, input_spec, load_model
from visioncare.tasks.train import run as train


@pytest.mark.slow
def test_checkpoint_rebuilds_model_and_preprocessing(make_cfg):
    cfg = make_cfg("trainer.max_epochs=1", "logger=none", "test=false")
    train(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    model, _ = load_model(best)
    assert model.net.backbone.default_cfg["architecture"] == "test_efficientnet"
    spec = input_spec(model)
    assert spec.image_size == 64 and spec.preprocess.size == 72
    # The same tensor the validation loader builds for an image.
    dm: FundusDataModule = instantiate(cfg.data)
    # The config's default normalisation is the backbone's, without the model handing it over.
    assert dm.mean == spec.mean == tuple(model.net.data_config["mean"])
    assert dm.std == spec.std == tuple(model.net.data_config["std"])
    dm.prepare_data()
    dm.setup("fit")
    record = dm.splits["val"][0]
    expected = dm.datasets["val"][0]["image"]
    assert torch.allclose(ImagePreprocessor(spec)(record.image), expected)
    with torch.no_grad():
        logits = model(expected[None])
    assert logits["dr"].shape == (1, 5) and logits["dme"].shape == (1, 3)
