"""GradualUnfreezing: which parameters train at each stage, BatchNorm modes, trainable fraction."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from visioncare.callbacks.unfreeze import GradualUnfreezing
from visioncare.errors import ConfigurationError
from visioncare.models.module import VisionCareModule


@pytest.fixture(scope="module")
def module() -> VisionCareModule:
    return VisionCareModule(backbone="test_efficientnet", channels_last=False)


def _trainable_names(module):
    return {n for n, p in module.net.backbone.named_parameters() if p.requires_grad}


def test_stage_is_a_pure_function_of_the_epoch():
    cb = GradualUnfreezing(unfreeze_step=5)
    assert [cb.stage_at(e) for e in (0, 4, 5, 9, 10, 14, 15, 99)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert GradualUnfreezing(unfreeze_step=0).stage_at(0) == 3
    with pytest.raises(ConfigurationError):
        GradualUnfreezing(unfreeze_step=-1)


def test_stages_unfreeze_top_down(module):
    cb = GradualUnfreezing(unfreeze_step=1)
    blocks = module.net.backbone_blocks()
    names = {id(p): n for n, p in module.net.backbone.named_parameters()}
    previous: set[str] = set()
    fractions = []
    for stage in range(4):
        fractions.append(cb.apply(module, stage))
        trainable = _trainable_names(module)
        assert previous <= trainable  # never re-freezes within a run
        previous = trainable
        # heads and the loss's log-variances always train
        assert all(p.requires_grad for p in module.net.heads.parameters())
        assert all(p.requires_grad for p in module.loss_fn.parameters())
        if stage == 0:
            assert trainable == set()
        if stage in (1, 2):
            top = {names[id(p)] for p in blocks[-1]}
            stem = {names[id(p)] for p in blocks[0]}
            assert top <= trainable and not (stem & trainable)
    assert fractions[0] == 0.0 and fractions[3] == 1.0
    assert fractions == sorted(fractions) and 0 < fractions[1] < fractions[2] < 1


@pytest.mark.slow
def test_frozen_batchnorm_stays_in_eval_mode(module):
    cb = GradualUnfreezing(unfreeze_step=1)
    module.train()
    cb.apply(module, 1)
    module.train()  # what Lightning calls after each validation
    for bn in (m for m in module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        frozen = not any(p.requires_grad for p in bn.parameters(recurse=False))
        assert bn.training is not frozen
    cb.apply(module, 3)
    assert all(m.training for m in module.net.backbone.modules())


@pytest.mark.slow
def test_frozen_batchnorm_running_stats_do_not_change(module):
    cb = GradualUnfreezing(unfreeze_step=1)
    module.train()
    cb.apply(module, 0)
    bn = next(m for m in module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    module(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bn.running_mean)


def test_param_groups_cover_every_parameter_once(module):
    groups = module.parameter_groups()
    assert [g["name"] for g in groups if not g["name"].endswith("_no_decay")] == [
        "heads",
        "loss",
        "backbone_top",
        "backbone_mid",
        "backbone_rest",
    ]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.parameters()))
    assert next(g for g in groups if g["name"] == "loss")["weight_decay"] == 0.0


def test_callback_is_a_lightning_callback():
    assert isinstance(GradualUnfreezing(), Callback)


def test_stage_zero_runs_no_backward_through_the_backbone(module):
    GradualUnfreezing(unfreeze_step=1).apply(module, 0)
    features = module.net.backbone(torch.randn(2, 3, 64, 64))
    assert not features.requires_grad  # no autograd graph is recorded for the frozen backbone
    GradualUnfreezing(unfreeze_step=1).apply(module, 1)
    assert module.net.backbone(torch.randn(2, 3, 64, 64)).requires_grad


def test_weight_decay_only_on_weights_with_two_or_more_dims(module):
    """timm's rule, checked against timm's own helper: biases and norm parameters never decay,
    and the loss's log-variances never decay either."""
    from timm.optim import param_groups_weight_decay

    groups = module.parameter_groups()
    decayed = {id(p) for g in groups if g.get("weight_decay", None) != 0.0 for p in g["params"]}
    assert all(p.ndim >= 2 for g in groups for p in g["params"] if id(p) in decayed)
    for p in module.net.parameters():
        p.requires_grad_(True)  # timm's helper skips frozen parameters; ours groups them all
    timm_groups = param_groups_weight_decay(module.net, weight_decay=0.01)
    timm_decayed = {id(p) for g in timm_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == timm_decayed
    assert not decayed & {id(p) for p in module.loss_fn.parameters()}
