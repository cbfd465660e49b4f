"""Epoch metrics against hand-computed values."""

import math
from types import SimpleNamespace

import torch

from visioncare.models.module import VisionCareModule
from visioncare.scoring.metrics import MultiTaskMetrics, mean_f1


def _one_hot_logits(preds, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float()


def test_metrics_match_hand_computation():
    dr_true = [0, 0, 1, 2, 2, 4]
    dr_pred = [0, 1, 1, 2, 3, 4]
    dme_true = [0, 0, 1, 2, -1, 2]
    dme_pred = [0, 0, 2, 2, 1, 2]
    metrics = MultiTaskMetrics("val")
    # Two batches: accumulation across updates must equal one big batch.
    for lo, hi in ((0, 4), (4, 6)):
        metrics.update(
            {"dr": _one_hot_logits(dr_pred[lo:hi], 5), "dme": _one_hot_logits(dme_pred[lo:hi], 3)},
            {"dr": torch.tensor(dr_true[lo:hi]), "dme": torch.tensor(dme_true[lo:hi])},
        )
    out = metrics.compute()
    assert math.isclose(out["val/acc_dr"], 4 / 6, rel_tol=1e-6)
    assert math.isclose(out["val/acc_dme"], 4 / 5, rel_tol=1e-6)  # the -1 sample is ignored
    assert math.isclose(out["val/avg_acc"], (4 / 6 + 4 / 5) / 2, rel_tol=1e-6)
    # joint: samples labelled for both tasks (5) with both right: idx 0, 3, 5 → 3/5
    assert math.isclose(out["val/joint_acc"], 3 / 5, rel_tol=1e-6)
    # per-class recall for DR: class0 1/2, class1 1/1, class2 1/2, class3 absent, class4 1/1
    assert math.isclose(out["val/per_class_acc_dr_0"], 0.5, rel_tol=1e-6)
    assert math.isclose(out["val/per_class_acc_dr_1"], 1.0, rel_tol=1e-6)
    assert math.isclose(out["val/per_class_acc_dr_2"], 0.5, rel_tol=1e-6)
    # macro-F1 for DME: class0 P=1 R=1 F=1; class1 P=0 R=0 F=0; class2 P=2/3 R=1 F=0.8
    assert math.isclose(out["val/f1_dme"], (1 + 0 + 0.8) / 3, rel_tol=1e-5)
    # quadratic kappa for DME by hand
    t = torch.tensor([0, 0, 1, 2, 2])
    p = torch.tensor([0, 0, 2, 2, 2])
    observed = torch.zeros(3, 3)
    for a, b in zip(t, p, strict=True):
        observed[a, b] += 1
    w = torch.tensor([[(i - j) ** 2 / 4 for j in range(3)] for i in range(3)])
    expected = torch.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    kappa = 1 - (w * observed).sum() / (w * expected).sum()
    assert math.isclose(out["val/qwk_dme"], float(kappa), rel_tol=1e-5)
    cm = metrics.confusion_matrices()["dr"]
    assert cm[2, 3] == 1 and cm.sum() == 6


def test_task_without_labels_reports_nan_and_avg_uses_the_other():
    metrics = MultiTaskMetrics("val")
    metrics.update(
        {"dr": _one_hot_logits([1, 2], 5), "dme": _one_hot_logits([0, 0], 3)},
        {"dr": torch.tensor([1, 3]), "dme": torch.tensor([-1, -1])},
    )
    out = metrics.compute()
    assert math.isnan(out["val/acc_dme"]) and math.isnan(out["val/joint_acc"])
    assert math.isclose(out["val/avg_acc"], 0.5)
    assert math.isclose(mean_f1(out, "val"), out["val/f1_dr"])


def test_reset_clears_state():
    metrics = MultiTaskMetrics("test")
    metrics.update(
        {"dr": _one_hot_logits([1], 5), "dme": _one_hot_logits([0], 3)},
        {"dr": torch.tensor([1]), "dme": torch.tensor([0])},
    )
    metrics.reset()
    metrics.update(
        {"dr": _one_hot_logits([2], 5), "dme": _one_hot_logits([1], 3)},
        {"dr": torch.tensor([1]), "dme": torch.tensor([0])},
    )
    assert metrics.compute()["test/acc_dr"] == 0.0


def test_training_epoch_values_are_logged_once_per_epoch():
    """Train losses/metrics accumulate per step (no per-step logging) and match a hand count."""
    module = VisionCareModule(backbone="test_efficientnet", channels_last=False).eval()
    module._trainer = SimpleNamespace(current_epoch=0, global_step=0, num_training_batches=3)
    logged: list[dict] = []
    module.log_dict = lambda values, **kwargs: logged.append(dict(values))
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn(size, 3, 32, 32, generator=generator),
            "dr": torch.randint(0, 5, (size,), generator=generator),
            "dme": torch.full((size,), -1),  # DME ungraded all epoch: its metrics must be NaN
        }
        for size in (4, 4, 2)
    ]
    losses, correct = [], 0
    with torch.no_grad():
        for batch in batches:
            logits = module(batch["image"])
            total, _ = module.loss_fn(logits, {"dr": batch["dr"], "dme": batch["dme"]})
            losses.append(float(total) * len(batch["dr"]))
            correct += int((logits["dr"].argmax(dim=1) == batch["dr"]).sum())
    for index, batch in enumerate(batches):
        module.training_step(batch, index)
        if index < len(batches) - 1:
            module.on_train_batch_end(None, batch, index)
    assert logged == []  # nothing per step
    # After the epoch's last batch, inside the loop: Lightning reduces the values before any
    # on_train_epoch_end hook, so EpochMetricsCSV's row has them without asking the module.
    module.on_train_batch_end(None, batches[-1], len(batches) - 1)
    values = {k: float(v) for k, v in logged[0].items()}
    assert math.isclose(values["train/loss"], sum(losses) / 10, rel_tol=1e-5)
    assert math.isclose(values["train/acc_dr"], correct / 10, rel_tol=1e-6)
    assert values["train/num_dr"] == 10 and values["train/num_dme"] == 0
    assert math.isnan(values["train/acc_dme"]) and math.isnan(values["train/joint_acc"])
    assert {"loss/sigma_dr", "loss/sigma_dme", "train/f1_dr", "train/loss_dme"} <= set(values)
    module.on_train_epoch_end()  # already logged this epoch: nothing more
    assert len(logged) == 1
