"""Grad-CAM (`visioncare.serving.explain`): batching leaves each CAM unchanged; target layer."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch

from visioncare.serving.explain import find_target_layer, write_gradcam
from visioncare.serving.loading import ImagePreprocessor, input_spec, load_model


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, synthetic_root) -> tuple[Path, list[Path]]:
    """The session's tiny checkpoint and the first few photos of the synthetic set."""
    images = sorted(
        p for p in Path(synthetic_root).rglob("*") if p.suffix.lower() in (".jpg", ".png")
    )
    assert len(images) >= 3
    return tiny_checkpoint, images[:3]


@pytest.mark.slow
def test_batched_gradcam_equals_one_image_at_a_time(tmp_path, trained):
    """Batching (both tasks, several images per pass) must not change any image's CAM."""
    ckpt, images = trained
    model, _ = load_model(ckpt)
    spec = input_spec(model)
    paths = images[:3]
    preprocessor = ImagePreprocessor(spec)
    with torch.no_grad():
        logits = model(torch.stack([preprocessor(p) for p in paths]))
    probs = {task: value.softmax(dim=1) for task, value in logits.items()}
    errors = [""] * len(paths)
    one = write_gradcam(model, spec, paths, probs, errors, tmp_path / "one", batch_size=1, size=96)
    many = write_gradcam(
        model, spec, paths, probs, errors, tmp_path / "many", batch_size=3, size=96
    )
    assert sorted(p.name for p in one) == sorted(p.name for p in many)
    assert len(one) == 2 * len(paths)
    for path in one:
        a = cv2.imread(str(path)).astype(int)
        b = cv2.imread(str(tmp_path / "many" / path.name)).astype(int)
        assert np.abs(a - b).max() <= 2, path.name


@pytest.mark.parametrize(
    ("backbone", "expected"), [("test_efficientnet", "bn2"), ("resnet18", "layer4")]
)
def test_gradcam_target_is_the_last_spatial_feature_map(backbone, expected):
    net = timm.create_model(backbone, pretrained=False, num_classes=0)
    layer = find_target_layer(net, image_size=64)
    assert [name for name, module in net.named_modules() if module is layer] == [expected]
