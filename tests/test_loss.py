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
    # ConfigurationError: the entry points turn it into one `ERROR:` line, exit 2.
    with pytest.raises(ConfigurationError, match=r"class_weights\.dme has 2 values"):
        UncertaintyWeightedLoss(class_weights={"dme": [1, 2]})
    with pytest.raises(ConfigurationError, match="unknown tasks"):
        FixedWeightLoss(weights={"dmee": 1.0})


def test_task_without_labels_contributes_nothing_not_even_its_regulariser():
    loss = UncertaintyWeightedLoss()
    with torch.no_grad():
        loss.log_vars["dme"].fill_(0.4)
    logits = {"dr": torch.randn(3, 5), "dme": torch.randn(3, 3)}
    targets = {"dr": torch.tensor([1, 2, 3]), "dme": torch.full((3,), -1)}
    total, parts = loss(logits, targets)
    dr_only = 0.5 * torch.exp(-loss.log_vars["dr"]) * parts["dr"] + 0.5 * loss.log_vars["dr"]
    assert torch.allclose(total, dr_only)  # no 0.5 * s_dme = 0.2 added
    total.backward()
    assert loss.log_vars["dme"].grad is not None  # in the graph (DDP), but...
    assert loss.log_vars["dme"].grad.item() == 0.0  # ...not pushed anywhere


def test_masked_cross_entropy_matches_torch_on_the_graded_samples():
    torch.manual_seed(1)
    logits, target = torch.randn(9, 5), torch.tensor([0, -1, 4, 2, -1, 1, 3, 3, -1])
    graded = target != -1
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    for kwargs in ({}, {"weight": weight}, {"weight": weight, "label_smoothing": 0.1}):
        expected = F.cross_entropy(logits[graded], target[graded], **kwargs)
        assert torch.allclose(masked_cross_entropy(logits, target, **kwargs), expected, atol=1e-6)


def _fit_log_vars(batches, steps: int = 600) -> dict[str, float]:
    """sigma per task after SGD on the log-variances alone, over fixed logits (no network)."""
    loss = UncertaintyWeightedLoss()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.05)
    for step in range(steps):
        logits, targets = batches[step % len(batches)]
        optimizer.zero_grad()
        loss(logits, targets)[0].backward()
        optimizer.step()
    return {task: float(sigma) for task, sigma in loss.task_sigmas().items()}


def _graded_batch(generator: torch.Generator, size: int = 8):
    logits = {"dr": torch.randn(size, 5, generator=generator) * 2, "dme": torch.randn(size, 3)}
    targets = {
        "dr": torch.randint(0, 5, (size,), generator=generator),
        "dme": torch.randint(0, 3, (size,), generator=generator),
    }
    return logits, targets


def test_dr_only_data_leaves_sigma_dme_at_its_initial_value():
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        logits, targets = _graded_batch(generator)
        batches.append((logits, {**targets, "dme": torch.full_like(targets["dme"], -1)}))
    sigmas = _fit_log_vars(batches)
    assert sigmas["dme"] == 1.0  # exactly exp(0.5 * 0): never moved
    assert sigmas["dr"] != 1.0  # the graded task did learn its weight


def test_mixed_data_gives_the_sigma_of_the_graded_samples_alone():
    """IDRiD + APTOS-like mixing: half the batches carry no DME grade.

    Before the fix the ungraded batches' ``0.5 * s`` pulled sigma_DME to sqrt(p * CE) instead
    of sqrt(CE) (p = 1/2 here: ~0.71x); now both runs settle on the same value.
    """
    generator = torch.Generator().manual_seed(0)
    graded = [_graded_batch(generator) for _ in range(4)]
    dr_only = []
    for _ in range(4):
        logits, targets = _graded_batch(generator)
        dr_only.append((logits, {**targets, "dme": torch.full_like(targets["dme"], -1)}))
    mixed = [batch for pair in zip(graded, dr_only, strict=True) for batch in pair]
    alone = _fit_log_vars(graded)["dme"]
    together = _fit_log_vars(mixed, steps=1200)["dme"]  # same number of DME-graded steps
    assert together == pytest.approx(alone, rel=0.03)
