"""UncertaintyWeightedLoss and FixedWeightLoss against hand computations."""

import math

import pytest
import torch
from torch.nn import functional as F

from visioncare.errors import ConfigurationError
from visioncare.models.loss import FixedWeightLoss, UncertaintyWeightedLoss, masked_cross_entropy


def _batch():
    torch.manual_seed(0)
    logits = {"dr": torch.randn(4, 5), "dme": torch.randn(4, 3)}
    targets = {"dr": torch.tensor([0, 2, 4, 1]), "dme": torch.tensor([0, -1, 2, -1])}
    return logits, targets


def test_uncertainty_loss_matches_kendall_formula():
    logits, targets = _batch()
    loss = UncertaintyWeightedLoss()
    with torch.no_grad():
        loss.log_vars["dr"].fill_(0.7)
        loss.log_vars["dme"].fill_(-0.3)
    total, parts = loss(logits, targets)
    ce_dr = F.cross_entropy(logits["dr"], targets["dr"])
    ce_dme = F.cross_entropy(logits["dme"][[0, 2]], targets["dme"][[0, 2]])
    sigma2_dr, sigma2_dme = math.exp(0.7), math.exp(-0.3)
    # L = L_DR/(2σ²_DR) + L_DME/(2σ²_DME) + log σ_DR + log σ_DME
    expected = (
        ce_dr / (2 * sigma2_dr)
        + ce_dme / (2 * sigma2_dme)
        + 0.5 * math.log(sigma2_dr)
        + 0.5 * math.log(sigma2_dme)
    )
    assert torch.allclose(total, expected, atol=1e-6)
    assert torch.allclose(parts["dr"], ce_dr) and torch.allclose(parts["dme"], ce_dme)


def test_log_variances_start_at_zero_and_receive_gradients():
    logits, targets = _batch()
    loss = UncertaintyWeightedLoss()
    assert all(float(s.detach()) == 0.0 for s in loss.log_vars.values())
    total, parts = loss(logits, targets)
    total.backward()
    for task in ("dr", "dme"):
        grad = loss.log_vars[task].grad
        # d/ds [0.5 e^{-s} L + 0.5 s] at s = 0 is 0.5 (1 - L)
        assert grad is not None
        assert torch.allclose(grad, 0.5 * (1 - parts[task].detach()), atol=1e-6)


def test_unlabelled_samples_are_masked():
    logits, targets = _batch()
    masked = masked_cross_entropy(logits["dme"], targets["dme"])
    assert torch.allclose(masked, F.cross_entropy(logits["dme"][[0, 2]], targets["dme"][[0, 2]]))


def test_batch_without_labels_gives_zero_not_nan_and_keeps_graph():
    logits = {
        "dr": torch.randn(3, 5, requires_grad=True),
        "dme": torch.randn(3, 3, requires_grad=True),
    }
    targets = {"dr": torch.tensor([1, 2, 3]), "dme": torch.full((3,), -1)}
    total, parts = UncertaintyWeightedLoss()(logits, targets)
    assert parts["dme"].item() == 0.0
    assert torch.isfinite(total)
    total.backward()
    assert torch.count_nonzero(logits["dme"].grad) == 0


def test_fixed_weights_and_class_weights():
    logits, targets = _batch()
    loss = FixedWeightLoss(weights={"dr": 2.0, "dme": 0.5}, class_weights={"dr": [1, 2, 1, 1, 3]})
    total, parts = loss(logits, targets)
    ce_dr = F.cross_entropy(logits["dr"], targets["dr"], weight=torch.tensor([1.0, 2, 1, 1, 3]))
    assert torch.allclose(parts["dr"], ce_dr)
    assert torch.allclose(total, 2.0 * parts["dr"] + 0.5 * parts["dme"])
    assert list(loss.parameters()) == []


def test_bad_loss_config_is_named():
    with pytest.raises(ValueError, match=r"class_weights\.dme has 2 values"):
        UncertaintyWeightedLoss(class_weights={"dme": [1, 2]})
    with pytest.raises(ValueError, match="unknown tasks"):
        FixedWeightLoss(weights={"dmee": 1.0})
    assert issubclass(ConfigurationError, Exception)
