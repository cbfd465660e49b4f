"""The one scoring implementation of reports (`visioncare.scoring.bootstrap.weighted_metrics`)
against two independent oracles: the in-training torchmetrics collection (so training logs and
reports agree) and scikit-learn (so neither shares a mistake with the other)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
)
from torchmetrics.classification import MulticlassCalibrationError

from visioncare.scoring.bootstrap import (
    ECE_BINS,
    bootstrap_intervals,
    interval_names,
    outcomes_from_probs,
    point_metrics,
)
from visioncare.scoring.metrics import MultiTaskMetrics
from visioncare.scoring.referral import REFERABLE_FROM

TASKS = {"dr": 5, "dme": 3}
THRESHOLDS = {"dr": 0.4, "dme": 0.5}


def _sample(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probabilities better than chance, in float32 like the network's; some ungraded images."""
    rng = np.random.default_rng(seed)
    targets = {t: rng.integers(0, c, n) for t, c in TASKS.items()}
    probs = {}
    for task, c in TASKS.items():
        logits = rng.normal(0, 1.5, (n, c))
        logits[np.arange(n), targets[task]] += 1.5
        probs[task] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    targets["dme"][rng.random(n) < 0.15] = -1
    return probs, targets


def test_training_metrics_equal_report_metrics():
    """`MultiTaskMetrics` (logged during training) and the report give the same numbers."""
    probs, targets = _sample(200, seed=4)
    training = MultiTaskMetrics("val")
    training.update(
        {t: torch.tensor(p) for t, p in probs.items()},
        {t: torch.tensor(v) for t, v in targets.items()},
    )
    logged = training.compute()
    report = point_metrics(outcomes_from_probs(probs, targets, THRESHOLDS))
    compared = 0
    for key, value in logged.items():
        name = key.split("/", 1)[1]
        if name.startswith("num_"):
            continue
        assert report[name] == pytest.approx(value, abs=1e-6), name
        compared += 1
    assert compared >= 2 * 3 + 2  # acc, f1, qwk per task, avg_acc, joint_acc at least
    for task, c in TASKS.items():
        labelled = targets[task] >= 0
        ece = MulticlassCalibrationError(num_classes=c, n_bins=ECE_BINS, norm="l1")(
            torch.tensor(probs[task][labelled]), torch.tensor(targets[task][labelled])
        )
        assert report[f"ece_{task}"] == pytest.approx(float(ece), abs=1e-6)


def test_report_metrics_equal_scikit_learn():
    probs, targets = _sample(150, seed=5)
    # sklearn's log_loss wants rows that sum to one in float64.
    probs = {t: p.astype(np.float64) for t, p in probs.items()}
    probs = {t: p / p.sum(1, keepdims=True) for t, p in probs.items()}
    report = point_metrics(outcomes_from_probs(probs, targets, THRESHOLDS))
    accs = []
    for task, c in TASKS.items():
        keep = targets[task] >= 0
        y, p = targets[task][keep], probs[task][keep]
        pred = p.argmax(1)
        accs.append(accuracy_score(y, pred))
        assert report[f"acc_{task}"] == pytest.approx(accs[-1])
        # Macro-F1 over the grades that occur (as true or predicted).
        assert report[f"f1_{task}"] == pytest.approx(f1_score(y, pred, average="macro"))
        qwk = cohen_kappa_score(y, pred, weights="quadratic")
        assert report[f"qwk_{task}"] == pytest.approx(qwk)
        recalls = recall_score(y, pred, labels=list(range(c)), average=None, zero_division=0)
        for k in range(c):
            assert report[f"per_class_acc_{task}_{k}"] == pytest.approx(recalls[k])
        onehot = np.eye(c)[y]
        assert report[f"brier_{task}"] == pytest.approx(((p - onehot) ** 2).sum(1).mean())
        assert report[f"nll_{task}"] == pytest.approx(log_loss(y, p, labels=list(range(c))))
        truth = y >= REFERABLE_FROM[task]
        score = p[:, REFERABLE_FROM[task] :].sum(1)
        assert report[f"referable_{task}_auroc"] == pytest.approx(roc_auc_score(truth, score))
        decision = score >= THRESHOLDS[task]
        assert report[f"referable_{task}_sensitivity"] == pytest.approx(
            recall_score(truth, decision)
        )
        assert report[f"referable_{task}_specificity"] == pytest.approx(
            recall_score(~truth, ~decision)
        )
    assert report["avg_acc"] == pytest.approx(np.mean(accs))
    both = targets["dme"] >= 0
    right = np.all([probs[t].argmax(1) == targets[t] for t in TASKS], axis=0)
    assert report["joint_acc"] == pytest.approx(right[both].mean())


def test_calibration_intervals_come_from_the_same_function():
    """A bootstrap draw is the point function applied to the resampled images."""
    probs, targets = _sample(80, seed=6)
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    names = interval_names(outcomes)
    assert {"nll_dr", "brier_dme", "ece_dr"} <= set(names)
    one = bootstrap_intervals(outcomes, None, resamples=1, seed=3, names=names)
    rows = np.random.default_rng(3).integers(0, 80, size=(1, 80))[0]
    resampled = point_metrics(
        outcomes_from_probs(
            {t: p[rows] for t, p in probs.items()},
            {t: v[rows] for t, v in targets.items()},
            THRESHOLDS,
        )
    )
    for name in names:
        assert one[name][0] == pytest.approx(resampled[name], abs=1e-9), name


def test_subgroups_score_each_group_with_the_report_function():
    """Per source and laterality: each group large enough gets the report function's values on
    its own images and an interval; a small group only its count."""
    from pathlib import Path

    from visioncare.data.records import Record
    from visioncare.scoring.report import subgroup_metrics

    probs, targets = _sample(60, seed=8)
    records = [
        Record(
            image=Path(f"img{i}.png"),
            dr=int(targets["dr"][i]),
            dme=int(targets["dme"][i]),
            source="idrid" if i < 50 else "aptos",
            key=f"k{i}",
            laterality="L" if i % 2 else "",
        )
        for i in range(60)
    ]
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    out = subgroup_metrics(outcomes, records, "test", 20, resamples=20, seed=0)
    assert out["test/group/source=aptos/num"] == 10
    assert "test/group/source=aptos/acc_dr" not in out  # below min_size: count only
    left = np.arange(60) % 2 == 1
    expected = point_metrics(
        outcomes_from_probs(
            {t: p[left] for t, p in probs.items()},
            {t: v[left] for t, v in targets.items()},
            THRESHOLDS,
        )
    )
    prefix = "test/group/laterality=L"
    assert out[f"{prefix}/num"] == 30 and out["test/group/laterality=unknown/num"] == 30
    for name in ("acc_dr", "qwk_dme", "ece_dr", "referable_dr_auroc"):
        assert out[f"{prefix}/{name}"] == pytest.approx(expected[name]), name
        assert out[f"{prefix}/{name}_ci_low"] <= out[f"{prefix}/{name}_ci_high"]
    assert out["test/group/source=idrid/num"] == 50 and "test/group/source=idrid/f1_dr" in out


def test_eval_plots_draw_reliability_and_the_operating_point(tmp_path):
    """Reliability diagrams per task (calibrated beside raw) and ROC curves with the point."""
    from visioncare.scoring.calibration import apply_temperature
    from visioncare.scoring.report import compute_metrics, uncertainty_metrics, write_eval_plots

    generator = torch.Generator().manual_seed(0)
    targets = {"dr": torch.randint(0, 5, (60,), generator=generator)}
    targets["dme"] = torch.randint(0, 3, (60,), generator=generator)
    raw = {
        t: torch.softmax(3 * torch.randn(60, n, generator=generator), dim=1)
        for t, n in {"dr": 5, "dme": 3}.items()
    }
    calibrated = {t: apply_temperature(p, 2.0) for t, p in raw.items()}
    metrics = compute_metrics(calibrated, targets, torch.zeros(60, dtype=torch.long), ["synth"])
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in calibrated.items()},
        {t: v.numpy() for t, v in targets.items()},
        {"dr": 0.5, "dme": 0.5},
    )
    metrics.update(uncertainty_metrics(outcomes, [str(i) for i in range(60)], "test", 50, 0))
    written = write_eval_plots(tmp_path, metrics, calibrated, targets, "test", raw)
    names = {p.name for p in written}
    assert {"reliability_dr.png", "reliability_dme.png", "roc_referable_dr.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)


def test_epoch_curves_tick_whole_epochs(tmp_path, monkeypatch):
    from visioncare.scoring import plots

    ticks = []

    def keep_ticks(fig, path):
        fig.canvas.draw()
        ticks.append([t for t in fig.axes[0].get_xticks() if 0 <= t <= 2])
        return path

    monkeypatch.setattr(plots, "_save", keep_ticks)
    rows = [{"epoch": e, "val/avg_acc": 0.5 + e / 10} for e in range(3)]
    plots.plot_curves(rows, tmp_path)
    assert ticks and all(float(t).is_integer() for t in ticks[1])
