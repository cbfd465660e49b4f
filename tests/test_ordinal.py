"""CORN ordinal DR head and timm gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from visioncare.errors import ConfigurationError
from visioncare.models.loss import UncertaintyWeightedLoss, masked_cross_entropy
from visioncare.models.net import TwoHeadNet, corn_log_probs


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_corn_probabilities_match_a_hand_computation():
    z = [0.5, -1.0, 2.0, 0.0]
    s = [_sig(v) for v in z]  # P(y > k | y > k-1)
    gt = [s[0], s[0] * s[1], s[0] * s[1] * s[2], s[0] * s[1] * s[2] * s[3]]
    expected = [1 - gt[0], gt[0] - gt[1], gt[1] - gt[2], gt[2] - gt[3], gt[3]]
    log_p = corn_log_probs(torch.tensor([z]))
    assert log_p.shape == (1, 5)
    assert torch.allclose(log_p.exp(), torch.tensor([expected]), atol=1e-6)
    # Softmax of the output is the same distribution: consumers that softmax "logits" are right.
    assert torch.allclose(log_p.softmax(1), log_p.exp(), atol=1e-6)
    # Rank consistency: P(y > k) never increases with k.
    tail = log_p.exp().flip(1).cumsum(1).flip(1)[0, 1:]
    assert torch.all(tail[1:] <= tail[:-1] + 1e-7)


def test_corn_loss_is_the_sum_of_the_conditional_binary_losses_and_masks_minus_one():
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([2, 4, -1])
    loss = masked_cross_entropy(corn_log_probs(z), labels)
    # Hand: label 2 takes tasks 0,1 (target 1) and task 2 (target 0); label 4 tasks 0..3 (1).
    s = [[_sig(v) for v in row] for row in z.tolist()]
    first = -(math.log(s[0][0]) + math.log(s[0][1]) + math.log(1 - s[0][2]))
    second = -sum(math.log(v) for v in s[1])
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_corn_is_finite_for_extreme_logits():
    log_p = corn_log_probs(torch.tensor([[80.0, -80.0, 80.0, -80.0], [-1e4, 1e4, 0.0, 0.0]]))
    assert torch.isfinite(log_p).all()
    assert torch.allclose(log_p.exp().sum(1), torch.ones(2), atol=1e-5)


def test_ordinal_net_outputs_five_log_probabilities_and_trains_with_uncertainty_loss():
    torch.manual_seed(0)
    net = TwoHeadNet("test_efficientnet", dr_head="ordinal")
    assert net.heads["dr"].linear.out_features == 4
    out = net(torch.randn(2, 3, 64, 64))
    assert out["dr"].shape == (2, 5) and out["dme"].shape == (2, 3)
    assert torch.allclose(out["dr"].exp().sum(1), torch.ones(2), atol=1e-5)
    loss_fn = UncertaintyWeightedLoss()
    total, _ = loss_fn(out, {"dr": torch.tensor([1, -1]), "dme": torch.tensor([-1, -1])})
    total.backward()
    assert net.heads["dr"].linear.weight.grad.abs().sum() > 0
    assert loss_fn.log_vars["dme"].grad is None or loss_fn.log_vars["dme"].grad == 0


def test_unknown_dr_head_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match=r"model\.dr_head"):
        TwoHeadNet("test_efficientnet", dr_head="coral")


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = TwoHeadNet("test_efficientnet", dropout=0.0, grad_checkpointing=checkpointing)
        net.train()
        assert getattr(net.backbone, "grad_checkpointing", False) is checkpointing
        out = net(x)
        loss = out["dr"].logsumexp(1).sum() + out["dme"].square().sum()
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ordinal_head_trains_through_hydra_and_exports_to_onnx(make_cfg, tmp_path):
    """One epoch via conf/train.yaml with model.dr_head=ordinal; the ONNX graph matches PyTorch."""
    import numpy as np
    import onnxruntime as ort
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF
    from visioncare.serving.loading import load_model
    from visioncare.tasks.export import run as export
    from visioncare.tasks.train import run as train

    cfg = make_cfg("model.dr_head=ordinal", "trainer.max_epochs=1", "logger=none", "test=false")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    model, _ = load_model(ckpt)
    assert model.net.heads["dr"].linear.out_features == 4  # the checkpoint rebuilt the CORN head
    out = tmp_path / "export"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        export_cfg = compose(
            config_name="export", overrides=[f"ckpt_path={ckpt}", f"output_dir={out}"]
        )
    GlobalHydra.instance().clear()
    export(export_cfg)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dr, dme = session.run(["dr_logits", "dme_logits"], {"image": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert np.abs(dr - expected["dr"].numpy()).max() < 1e-4
    assert np.abs(dme - expected["dme"].numpy()).max() < 1e-4
    assert np.allclose(np.exp(dr).sum(1), 1.0, atol=1e-5)
