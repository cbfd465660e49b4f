"""Bootstrap intervals, per-patient metrics and the validation operating point, by hand.

The bootstrap is re-done here the slow, obvious way: the same seeded draws of units, each draw
materialised as a resampled list of images and scored with torchmetrics' functional metrics, so
the weighted-count shortcut in `visioncare.scoring.bootstrap` cannot hide a mistake.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)

from visioncare.scoring.bootstrap import (
    bootstrap_intervals,
    outcomes_from_probs,
    patient_outcomes,
    point_metrics,
    resample_indices,
)
from visioncare.scoring.referral import choose_threshold, operating_points
from visioncare.scoring.report import compute_metrics

TASKS = {"dr": 5, "dme": 3}
THRESHOLDS = {"dr": 0.4, "dme": 0.5}


def _sample(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probabilities that agree with the labels more often than chance; a few ungraded images."""
    rng = np.random.default_rng(seed)
    targets = {t: rng.integers(0, c, n) for t, c in TASKS.items()}
    probs = {}
    for task, c in TASKS.items():
        logits = rng.normal(0, 1.5, (n, c))
        logits[np.arange(n), targets[task]] += 1.5
        probs[task] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets["dme"][rng.random(n) < 0.1] = -1
    return probs, targets


def _direct(probs: dict, targets: dict, rows: np.ndarray) -> dict[str, float]:
    """The metrics of one resampled image list, with torchmetrics."""
    out, accs = {}, []
    for task, c in TASKS.items():
        y = torch.tensor(targets[task][rows])
        p = torch.tensor(probs[task][rows])
        keep = y >= 0
        y, p = y[keep], p[keep]
        pred = p.argmax(1)
        out[f"acc_{task}"] = float(multiclass_accuracy(pred, y, c, average="micro"))
        out[f"f1_{task}"] = float(multiclass_f1_score(pred, y, c, average="macro"))
        kappa = float(multiclass_cohen_kappa(pred, y, c, weights="quadratic"))
        out[f"qwk_{task}"] = 0.0 if np.isnan(kappa) else kappa
        accs.append(out[f"acc_{task}"])
        start = {"dr": 2, "dme": 1}[task]
        truth, score = (y >= start).long(), p[:, start:].sum(1)
        decision = score >= THRESHOLDS[task]
        pos, neg = int(truth.sum()), int((1 - truth).sum())
        out[f"referable_{task}_sensitivity"] = (
            float(decision[truth == 1].float().mean()) if pos else np.nan
        )
        out[f"referable_{task}_specificity"] = (
            float((~decision[truth == 0]).float().mean()) if neg else np.nan
        )
        out[f"referable_{task}_auroc"] = (
            float(binary_auroc(score, truth)) if pos and neg else np.nan
        )
    out["avg_acc"] = float(np.mean(accs))
    both = (targets["dr"][rows] >= 0) & (targets["dme"][rows] >= 0)
    right = np.ones(len(rows), bool)
    for task in TASKS:
        right &= probs[task][rows].argmax(1) == targets[task][rows]
    out["joint_acc"] = float(right[both].mean())
    return out  # fmt: skip


def _percentiles(draws: list[dict[str, float]], level: float = 0.95) -> dict[str, tuple]:
    tail = 100 * (1 - level) / 2
    out = {}
    for name in draws[0]:
        values = np.array([d[name] for d in draws], dtype=float)
        values = values[~np.isnan(values)]
        out[name] = tuple(np.percentile(values, [tail, 100 - tail]))
    return out


def test_point_metrics_equal_torchmetrics():
    """The weighted-count metrics at weight 1 are eval's torchmetrics numbers."""
    probs, targets = _sample(150, seed=1)
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    ours = point_metrics(outcomes)
    theirs = compute_metrics(
        {t: torch.tensor(p) for t, p in probs.items()},
        {t: torch.tensor(v) for t, v in targets.items()},
        torch.zeros(150, dtype=torch.long),
        ["synthetic"],
        "test",
        THRESHOLDS,
    )
    for name, value in ours.items():
        assert value == pytest.approx(theirs[f"test/{name}"], abs=1e-5), name


def test_bootstrap_equals_direct_resampling_of_images():
    probs, targets = _sample(60, seed=2)
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    ours = bootstrap_intervals(outcomes, None, resamples=200, seed=7)
    draws = resample_indices(60, 200, seed=7)
    expected = _percentiles([_direct(probs, targets, rows) for rows in draws])
    assert set(ours) == set(expected)
    for name, (low, high) in expected.items():
        assert ours[name] == pytest.approx((low, high), abs=1e-5), name


def test_bootstrap_resamples_patients_with_both_eyes():
    """With patient ids, a draw takes whole patients: both eyes or neither."""
    probs, targets = _sample(40, seed=3)
    patients = [f"p{i // 2:02d}" for i in range(40)]  # sorted ids: unit k = images 2k, 2k+1
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    ours = bootstrap_intervals(outcomes, patients, resamples=150, seed=11)
    draws = resample_indices(20, 150, seed=11)
    expected = _percentiles(
        [_direct(probs, targets, np.concatenate([[2 * k, 2 * k + 1] for k in d])) for d in draws]
    )
    for name, (low, high) in expected.items():
        assert ours[name] == pytest.approx((low, high), abs=1e-5), name
    by_image = bootstrap_intervals(outcomes, None, resamples=150, seed=11)
    assert by_image["acc_dr"] != ours["acc_dr"]


def test_interval_narrows_with_more_samples_and_is_seeded():
    widths = []
    for n in (40, 160, 640):
        probs, targets = _sample(n, seed=4)
        outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
        low, high = bootstrap_intervals(outcomes, None, resamples=300, seed=0)["acc_dr"]
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0
    again = bootstrap_intervals(outcomes, None, resamples=300, seed=0)["acc_dr"]
    assert again == pytest.approx((low, high))


def test_patient_grade_is_the_worse_eye():
    """Hand case: three patients, two eyes each except one; one eye without a DME grade."""
    probs = {
        "dr": np.eye(5)[[0, 3, 1, 1, 4]] * 0.9 + 0.02,
        "dme": np.eye(3)[[0, 0, 2, 0, 1]] * 0.9 + 0.1 / 3,
    }
    targets = {"dr": np.array([0, 2, 1, 0, 4]), "dme": np.array([0, -1, 1, 0, 1])}
    patients = ["a", "a", "b", "b", "c"]
    per_patient, ids = patient_outcomes(outcomes_from_probs(probs, targets, THRESHOLDS), patients)
    assert ids == ["a", "b", "c"]
    assert per_patient.targets["dr"].tolist() == [2, 1, 4]
    assert per_patient.preds["dr"].tolist() == [3, 1, 4]
    assert per_patient.targets["dme"].tolist() == [0, 1, 1]
    assert per_patient.preds["dme"].tolist() == [0, 2, 1]
    metrics = point_metrics(per_patient)
    assert metrics["acc_dr"] == pytest.approx(2 / 3)  # a: 3 vs 2 wrong; b, c right
    assert metrics["acc_dme"] == pytest.approx(2 / 3)  # b: 2 vs 1 wrong
    assert metrics["joint_acc"] == pytest.approx(1 / 3)  # only c right on both
    assert metrics["referable_dr_sensitivity"] == pytest.approx(1.0)  # a and c referred
    assert metrics["referable_dr_specificity"] == pytest.approx(1.0)  # b not referred


def test_threshold_reaches_target_sensitivity():
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    truth = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    # 5 positives; 0.85 * 5 = 4.25 → 5 must be caught → the lowest positive score.
    assert choose_threshold(score, truth, 0.85) == pytest.approx(0.1)
    assert choose_threshold(score, truth, 0.6) == pytest.approx(0.6)  # 3 of 5
    assert choose_threshold(score, torch.zeros(10, dtype=torch.long), 0.85) is None
    probs = {"dr": torch.zeros(10, 5), "dme": torch.zeros(10, 3)}
    probs["dr"][:, 2], probs["dr"][:, 0] = score, 1 - score
    probs["dme"][:, 0] = 1.0
    targets = {"dr": truth * 3, "dme": torch.zeros(10, dtype=torch.long)}
    points = operating_points(probs, targets, 0.6)
    assert set(points) == {"dr"}  # no referable DME case on this split: no threshold
    assert points["dr"]["threshold"] == pytest.approx(0.6)
    assert points["dr"]["val_sensitivity"] == pytest.approx(0.6)
    assert points["dr"]["val_specificity"] == pytest.approx(4 / 5)  # only 0.7 is referred


def test_eval_reports_per_patient_metrics_only_when_patients_are_shared():
    from visioncare.scoring.report import uncertainty_metrics

    probs, targets = _sample(30, seed=5)
    outcomes = outcomes_from_probs(probs, targets, THRESHOLDS)
    alone = uncertainty_metrics(outcomes, [f"img{i}" for i in range(30)], "test", 50, 0)
    assert "test/patient/num_patients" not in alone and "test/acc_dr_ci_low" in alone
    patients = [f"p{i // 2}" for i in range(30)]
    shared = uncertainty_metrics(outcomes, patients, "test", 50, 0)
    assert shared["test/patient/num_patients"] == 15
    expected = point_metrics(patient_outcomes(outcomes, patients)[0])
    assert shared["test/patient/acc_dr"] == pytest.approx(expected["acc_dr"])
    assert shared["test/patient/qwk_dme_ci_low"] <= shared["test/patient/qwk_dme"]
    # Resampling patients, not images: the image-level interval differs from `alone`'s.
    assert shared["test/acc_dr_ci_low"] != alone["test/acc_dr_ci_low"] or (
        shared["test/acc_dr_ci_high"] != alone["test/acc_dr_ci_high"]
    )
