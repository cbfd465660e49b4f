"""Every parameter group follows the cosine schedule; frozen groups exist from the first step."""

import math
from functools import partial

import torch

from visioncare.models import VisionCareModule


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
    assert len(optimizer.param_groups) == 5
