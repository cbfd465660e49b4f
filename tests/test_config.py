"""Every config group composes and instantiates; environment-dependent choices are explicit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT
from visioncare.errors import ConfigurationError
from visioncare.models.net import TwoHeadNet, check_backbone_name
from visioncare.utils import accelerator


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data=idrid", "loss=fixed", "trainer=gpu", "logger=csv"],
        ["experiment=idrid_effv2s"],
        ["experiment=synthetic_tiny"],
        ["debug=default"],
        ["hparams_search=unfreeze_step"],
        ["trainer=ddp_cpu"],
        ["data=combined"],
        ["model=effv2s", "trainer.devices=1", "trainer.max_epochs=3", "trainer.precision=32-true"],
    ],
)
def test_config_groups_compose(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    assert cfg.model._target_.endswith("VisionCareModule")
    assert cfg.callbacks.gradual_unfreezing.unfreeze_step == cfg.unfreeze_step
    loss = instantiate(cfg.loss)
    assert isinstance(loss, torch.nn.Module)


def test_default_is_synthetic_effv2s(make_cfg):
    cfg = make_cfg("model=effv2s")
    assert cfg.model.backbone == "tf_efficientnetv2_s" and cfg.model.pretrained is False
    assert cfg.data.source._target_.endswith("SyntheticSource")
    assert cfg.seed == 42 and cfg.ckpt_path is None


def test_effv2s_uses_its_own_normalisation():
    net = TwoHeadNet("tf_efficientnetv2_s")
    assert tuple(net.data_config["mean"]) == (0.5, 0.5, 0.5)
    logits = net(torch.randn(2, 3, 64, 64))
    assert logits["dr"].shape == (2, 5) and logits["dme"].shape == (2, 3)


@pytest.mark.parametrize("preset", ["effv2s", "lite0", "tiny"])
def test_data_normalisation_defaults_to_the_backbones_own(make_cfg, preset):
    """`data.mean/std` resolve from model.backbone in the config: the model hands nothing over."""
    cfg = make_cfg(f"model={preset}")
    expected = TwoHeadNet(cfg.model.backbone).data_config
    assert tuple(cfg.data.mean) == tuple(expected["mean"])
    assert tuple(cfg.data.std) == tuple(expected["std"])
    overridden = make_cfg(f"model={preset}", "data.mean=[0.1,0.2,0.3]")
    assert list(overridden.data.mean) == [0.1, 0.2, 0.3]


def test_pretrained_offline_names_both_ways_out(monkeypatch):
    # Offline at once (read at import time, hence the constant): without it the blocked network
    # costs ~45 s of retries before the same error.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigurationError) as error:
        TwoHeadNet("test_efficientnet", pretrained=True)
    assert "model.pretrained=false" in str(error.value)
    assert "model.weights_path=FILE" in str(error.value)


def test_weights_path_loads_a_local_timm_checkpoint(tmp_path):
    source = TwoHeadNet("test_efficientnet")
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    loaded = TwoHeadNet("test_efficientnet", weights_path=str(path))
    for (name, a), (_, b) in zip(
        source.backbone.state_dict().items(), loaded.backbone.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigurationError, match="does not exist"):
        TwoHeadNet("test_efficientnet", weights_path=str(tmp_path / "missing.pth"))


def test_unknown_backbone_is_named():
    with pytest.raises(ConfigurationError, match="not a timm model"):
        TwoHeadNet("efficientnet_b99")


def test_auto_precision(monkeypatch):
    monkeypatch.setattr(accelerator, "cpu_has_native_bf16", lambda: False)
    assert accelerator.resolve_precision("auto", "cpu") == "32-true"
    assert accelerator.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # explicit wins
    monkeypatch.setattr(accelerator, "cpu_has_native_bf16", lambda: True)
    assert accelerator.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert accelerator.resolve_precision("auto", "gpu") == "16-mixed"


@pytest.mark.parametrize("native_bf16, expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_resolved_trainer_config_instantiates_as_is(make_cfg, monkeypatch, native_bf16, expected):
    """The composed trainer config says auto/null; resolved, Lightning builds it unchanged."""
    monkeypatch.setattr(accelerator, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = make_cfg("trainer=default", "trainer.accelerator=cpu", "logger=none")
    assert (cfg.trainer.precision, cfg.trainer.benchmark) == ("auto", None)
    flags = accelerator.resolve_trainer_flags(cfg)
    assert flags == {"precision": expected, "benchmark": False}
    assert (cfg.trainer.precision, cfg.trainer.benchmark) == (expected, False)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer) and trainer.precision == expected
    assert accelerator.resolve_trainer_flags(cfg) == flags  # resolving twice changes nothing
    explicit = make_cfg("trainer.precision=16-mixed", "trainer.benchmark=true")
    assert accelerator.resolve_trainer_flags(explicit) == {
        "precision": "16-mixed",
        "benchmark": True,
    }  # explicit Lightning values pass through


def test_accelerator_names_and_a_missing_gpu_are_configuration_errors(make_cfg, monkeypatch):
    """Found before any data is read, with the key and the names Lightning knows."""
    cfg = make_cfg("trainer.accelerator=nope", "logger=none")
    with pytest.raises(ConfigurationError, match=r"trainer\.accelerator=nope .*auto, cpu, cuda"):
        accelerator.resolve_trainer_flags(cfg)
    monkeypatch.setattr(accelerator.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accelerator.torch.backends.mps, "is_available", lambda: False)
    for name in ("gpu", "cuda", "mps"):
        with pytest.raises(ConfigurationError, match=f"accelerator={name} but PyTorch sees no"):
            accelerator.check_accelerator(name)
    for name in ("auto", "cpu"):
        accelerator.check_accelerator(name)  # fine without a GPU
    monkeypatch.setattr(accelerator.torch.backends.mps, "is_available", lambda: True)
    accelerator.check_accelerator("gpu")  # Lightning's gpu is MPS on a Mac without CUDA


def test_cudnn_benchmark_defaults_on_for_gpus_only():
    assert accelerator.resolve_benchmark(None, "gpu", deterministic=False) is True
    assert accelerator.resolve_benchmark(None, "gpu", deterministic=True) is None
    assert accelerator.resolve_benchmark(None, "cpu", deterministic=False) is None
    assert accelerator.resolve_benchmark(False, "gpu", deterministic=False) is False  # explicit


@pytest.mark.parametrize(
    "name",
    ["convnext_tiny.fb_in22k", "convnext_tiny_in22ft1k", "tf_efficientnetv2_s", "resnet50"],
)
def test_backbone_names_timm_accepts_are_accepted(name):
    check_backbone_name(name)  # a pretrained tag, a deprecated alias, plain names


def test_tagged_backbone_builds():
    net = TwoHeadNet("test_efficientnet.r160_in1k")
    assert net(torch.randn(1, 3, 64, 64))["dr"].shape == (1, 5)


def test_unknown_backbone_suggests_the_closest_names():
    with pytest.raises(ConfigurationError, match="did you mean efficientnetv2_s"):
        TwoHeadNet("efficientnet_v2s")
    with pytest.raises(ConfigurationError, match=r"no pretrained tag 'bogus'.*resnet50\.a1_in1k"):
        check_backbone_name("resnet50.bogus")


# The oldest release of each dependency that has an API the code calls (and where).
API_FLOORS = {
    "lightning": ("2.6", "Trainer.fit(weights_only=...) in training.py"),
    "albumentations": ("2.0", "A.Affine(fill=...) in data/transforms.py"),
    "torch": ("2.5", "torch.onnx.export(dynamo=False) in export.py"),
    "torchvision": ("0.20", "the torchvision release of torch 2.5"),
}


@pytest.mark.parametrize("package", sorted(API_FLOORS))
def test_dependency_floors_cover_the_apis_the_code_calls(package):
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirement = next(Requirement(d) for d in declared if Requirement(d).name == package)
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    needed, why = API_FLOORS[package]
    assert floors and min(floors) >= Version(needed), f"{package}>={needed} is needed: {why}"
