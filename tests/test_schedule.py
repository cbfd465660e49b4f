"""Every parameter group follows the cosine schedule; frozen groups exist from the first step."""

import math
from functools import partial

import torch

from visioncare.models.module import VisionCareModule


def test_every_group_follows_cosine():
    module = VisionCareModule(
        backbone="test_efficientnet",
        channels_last=False,
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10, eta_min=1e-4),
        backbone_lr_mult=0.1,
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    base = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert math.isclose(base["backbone_top"], 1e-3) and math.isclose(base["heads"], 1e-2)
    for epoch in range(1, 11):
        optimizer.step()
        scheduler.step()
        for group in optimizer.param_groups:
            start = base[group["name"]]
            expected = 1e-4 + (start - 1e-4) * (1 + math.cos(math.pi * epoch / 10)) / 2
            assert math.isclose(group["lr"], expected, rel_tol=1e-6), (group["name"], epoch)
    # Five groups (heads, loss, three backbone chunks), each but the loss with a no-decay twin.
    assert len(optimizer.param_groups) == 9


def test_discriminative_lr_decays_per_chunk_below_the_top():
    module = VisionCareModule(
        backbone="test_efficientnet",
        channels_last=False,
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        backbone_lr_mult=0.5,
        backbone_lr_decay=0.1,
    )
    groups = {g["name"]: g["lr"] for g in module.configure_optimizers()["optimizer"].param_groups}
    assert math.isclose(groups["heads"], 1e-2)
    assert math.isclose(groups["backbone_top"], 5e-3)
    assert math.isclose(groups["backbone_mid"], 5e-4)
    assert math.isclose(groups["backbone_rest"], 5e-5)


def test_frozen_parameters_get_no_adam_state_until_they_unfreeze():
    """Frozen parameters have no gradient, so AdamW skips them entirely: no weight decay, no
    moments. A newly unfrozen group starts from fresh moments (Adam's bias-corrected first
    step), never from stale ones accumulated while frozen."""
    from visioncare.callbacks.unfreeze import GradualUnfreezing

    module = VisionCareModule(
        backbone="test_efficientnet",
        channels_last=False,
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.5),
    )
    optimizer = module.configure_optimizers()["optimizer"]
    unfreezing = GradualUnfreezing(unfreeze_step=1)

    def step() -> None:
        optimizer.zero_grad()  # set_to_none, as Lightning does
        outputs = module(torch.randn(2, 3, 32, 32))
        sum(o.sum() for o in outputs.values()).backward()
        optimizer.step()

    unfreezing.apply(module, 0)
    frozen = {id(p): p.detach().clone() for p in module.net.backbone.parameters()}
    for _ in range(3):
        step()
    backbone = list(module.net.backbone.parameters())
    assert not any(p in optimizer.state for p in backbone)
    assert all(torch.equal(p, frozen[id(p)]) for p in backbone)  # weight decay skipped too
    unfreezing.apply(module, 1)
    step()
    top = module.net.top_blocks(0.25)
    assert all(int(optimizer.state[p]["step"]) == 1 for p in top)
    assert not any(p in optimizer.state for p in backbone if p.requires_grad is False)
