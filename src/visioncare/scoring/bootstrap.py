"""Bootstrap confidence intervals for the headline metrics, and the per-patient view.

One test set says little on its own (on 100 images one image is a point of accuracy), so eval
reports each headline metric with a percentile-bootstrap interval: the evaluated units are drawn
with replacement ``resamples`` times (seeded) and the metric is recomputed on every draw. The
unit is the patient when records carry patient ids (a patient's two eyes are correlated, so
resampling eyes would understate the width), otherwise the image.

This module is the one scoring implementation of reports: `weighted_metrics` computes every
number of `metrics.json` / `report.md` (accuracy, macro-F1, QWK, per-class recall, joint and
average accuracy, referable sensitivity/specificity/AUROC, and the calibration measures NLL,
Brier and ECE) for one row of weights per resample, so a thousand resamples are a handful of
matrix products. The weights of the identity draw (all ones) give the point estimates
(`point_metrics`), so a point value and its interval can never come from two definitions.
torchmetrics (`visioncare.scoring.metrics`) stays for in-training, DDP-synced logging; a test
pins the two equal on the same predictions.

Per patient, the clinical rule applies: a patient's grade is the worse eye's, for the grader's
grades and for the model's predicted grades alike; P(referable) is the larger of the eyes'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visioncare import IGNORE_INDEX, TASKS
from visioncare.scoring.referral import REFERABLE_FROM

# The metrics that get an interval (per task where the name has no task).
_REFERABLE_METRICS = ("sensitivity", "specificity", "auroc")
CI_METRICS = (
    "avg_acc",
    "joint_acc",
    *(f"{m}_{t}" for t in TASKS for m in ("acc", "f1", "qwk")),
    *(f"referable_{t}_{m}" for t in REFERABLE_FROM for m in _REFERABLE_METRICS),
)
# Calibration measures (per task) of the probabilities; with an interval too.
CALIBRATION_METRICS = ("nll", "brier", "ece")
# Bins of the expected calibration error: 15 equal-width confidence bins, L1 (torchmetrics'
# `MulticlassCalibrationError(n_bins=15, norm="l1")`).
ECE_BINS = 15


@dataclass(frozen=True)
class Outcomes:
    """Per evaluated unit (image or patient): true and predicted grades, P(referable).

    Attributes:
        targets: task → true grade (N,), -1 = not graded.
        preds: task → predicted grade (N,).
        scores: task → P(referable) (N,).
        thresholds: task → the operating threshold on P(referable).
        probs: task → class probabilities (N, classes); None where only grades are known (per
            patient), and then no calibration measures are computed.
    """

    targets: dict[str, np.ndarray]
    preds: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    thresholds: dict[str, float]
    probs: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.targets.values())))


def outcomes_from_probs(
    probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], thresholds: dict[str, float]
) -> Outcomes:
    """Grades (argmax) and P(referable) (summed referable grades) from softmax outputs.

    Summed in float64 whatever the input's precision, so every caller (point values, intervals,
    subsets) ranks the same scores: float32 sums of near-equal probabilities tie or not by chance.
    """
    probs = {t: np.asarray(probs[t], dtype=np.float64) for t in TASKS}
    return Outcomes(
        targets={t: np.asarray(targets[t]) for t in TASKS},
        preds={t: probs[t].argmax(axis=1) for t in TASKS},
        scores={t: probs[t][:, REFERABLE_FROM[t] :].sum(axis=1) for t in TASKS},
        thresholds=dict(thresholds),
        probs=probs,
    )


def patient_outcomes(outcomes: Outcomes, patients: Sequence[str]) -> tuple[Outcomes, list[str]]:
    """One row per patient: the worse eye's true grade (over graded eyes), the worse eye's
    predicted grade and the larger P(referable). Returns the rows and the patients' ids."""
    ids = sorted(set(patients))
    index = {p: i for i, p in enumerate(ids)}
    rows = np.array([index[p] for p in patients])

    def worst(values: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(len(ids), fill, dtype=np.result_type(values, type(fill)))
        np.maximum.at(out, rows, values)
        return out

    return (
        Outcomes(
            targets={t: worst(v, IGNORE_INDEX) for t, v in outcomes.targets.items()},
            preds={t: worst(v, -1) for t, v in outcomes.preds.items()},
            scores={t: worst(v, -np.inf) for t, v in outcomes.scores.items()},
            thresholds=outcomes.thresholds,
        ),
        ids,
    )


def resample_indices(num_units: int, num_resamples: int, seed: int) -> np.ndarray:
    """(resamples, units) indices drawn with replacement: the bootstrap draws, reproducible."""
    return np.random.default_rng(seed).integers(0, num_units, size=(num_resamples, num_units))


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )


def _confusion(weights: np.ndarray, target: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) weighted confusion counts, rows = true grade."""
    onehot = np.zeros((len(target), k * k))
    onehot[np.arange(len(target)), target * k + pred] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


def _task_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 (classes never seen nor predicted left out, as torchmetrics) and QWK."""
    k = confusion.shape[-1]
    total = confusion.sum(axis=(1, 2))
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    rows, cols = confusion.sum(axis=2), confusion.sum(axis=1)
    fp, fn = cols - tp, rows - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), 0.0)
    present = (tp + fp + fn) > 0
    grades = np.arange(k)
    penalty = (grades[:, None] - grades[None, :]) ** 2 / (k - 1) ** 2
    expected = rows[:, :, None] * cols[:, None, :] / np.where(total > 0, total, 1)[:, None, None]
    observed_cost = (penalty * confusion).sum(axis=(1, 2))
    expected_cost = (penalty * expected).sum(axis=(1, 2))
    # Kappa is undefined when both raters use one class; reported as 0 (see metrics._finite_kappa).
    qwk = np.where(
        expected_cost > 0, 1 - observed_cost / np.where(expected_cost > 0, expected_cost, 1), 0.0
    )
    recall = _divide(tp, rows)
    return {
        **{f"per_class_acc_{{task}}_{j}": recall[:, j] for j in range(k)},
        "acc": _divide(tp.sum(axis=1), total),
        "f1": _divide((f1 * present).sum(axis=1), present.sum(axis=1)),
        "qwk": np.where(total > 0, qwk, np.nan),
    }


def _calibration(weights: np.ndarray, prob: np.ndarray, target: np.ndarray) -> dict:
    """Weighted NLL, Brier score (sum over classes of the squared error, mean over images) and
    ECE (15 equal-width bins of the top-class confidence, |accuracy - confidence| weighted by
    the bin's share; a confidence of exactly 1 gets a bin of its own, as torchmetrics)."""
    total = weights.sum(axis=1)
    rows = np.arange(len(target))
    nll = -np.log(np.clip(prob[rows, target], 1e-12, None))
    onehot = np.zeros_like(prob)
    onehot[rows, target] = 1.0
    brier = ((prob - onehot) ** 2).sum(axis=1)
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == target).astype(float)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins = np.searchsorted(edges, confidence, side="right") - 1
    member = np.zeros((len(target), ECE_BINS + 1))
    member[rows, bins] = 1.0
    gap = (weights @ (member * (correct - confidence)[:, None])).__abs__().sum(axis=1)
    return {
        "nll": _divide(weights @ nll, total),
        "brier": _divide(weights @ brier, total),
        "ece": _divide(gap, total),
    }


def _auroc(weights: np.ndarray, score: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Weighted AUROC per row of weights: P(score_pos > score_neg) + ½ P(tie).

    Scores are sorted once and tied scores summed into one level (`np.add.reduceat`), so the
    memory is (rows × images), not (images × levels).
    """
    order = np.argsort(score, kind="stable")
    ranked, w, t = score[order], weights[:, order], truth[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if len(ranked) else []
    if len(starts) == 0:
        return np.full(weights.shape[0], np.nan)
    pos = np.add.reduceat(w * t, starts, axis=1)
    neg = np.add.reduceat(w * (1 - t), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = (pos * (below + 0.5 * neg)).sum(axis=1)
    return _divide(pairs, pos.sum(axis=1) * neg.sum(axis=1))


def weighted_metrics(outcomes: Outcomes, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every report metric per row of ``weights`` (B, N); NaN where undefined.

    The keys are `CI_METRICS`, ``per_class_acc_{task}_{k}`` and, where the outcomes carry
    probabilities, ``{nll,brier,ece}_{task}``.
    """
    out: dict[str, np.ndarray] = {}
    accs = []
    for task, k in TASKS.items():
        target, pred = outcomes.targets[task], outcomes.preds[task]
        labelled = target != IGNORE_INDEX
        w = weights[:, labelled]
        for name, value in _task_metrics(
            _confusion(w, target[labelled], pred[labelled], k)
        ).items():
            out[name.format(task=task) if "{task}" in name else f"{name}_{task}"] = value
        if outcomes.probs is not None:
            prob = outcomes.probs[task][labelled]
            for name, value in _calibration(w, prob, target[labelled]).items():
                out[f"{name}_{task}"] = value
        accs.append(out[f"acc_{task}"])
        truth = (target[labelled] >= REFERABLE_FROM[task]).astype(float)
        decision = (outcomes.scores[task][labelled] >= outcomes.thresholds[task]).astype(float)
        positives, negatives = w @ truth, w @ (1 - truth)
        out[f"referable_{task}_sensitivity"] = _divide(w @ (truth * decision), positives)
        out[f"referable_{task}_specificity"] = _divide(
            w @ ((1 - truth) * (1 - decision)), negatives
        )
        out[f"referable_{task}_auroc"] = _auroc(w, outcomes.scores[task][labelled], truth)
    # The mean over the tasks that have labels (as `MultiTaskMetrics`).
    stacked = np.stack(accs)
    graded = (~np.isnan(stacked)).sum(axis=0)
    out["avg_acc"] = _divide(np.nansum(stacked, axis=0), graded)
    all_labelled = np.all([outcomes.targets[t] != IGNORE_INDEX for t in TASKS], axis=0)
    all_right = np.all([outcomes.preds[t] == outcomes.targets[t] for t in TASKS], axis=0)
    out["joint_acc"] = _divide(weights @ (all_labelled & all_right), weights @ all_labelled)
    return out


def interval_names(outcomes: Outcomes) -> list[str]:
    """The metrics a report gives an interval: `CI_METRICS`, plus calibration with probs."""
    names = list(CI_METRICS)
    if outcomes.probs is not None:
        names += [f"{m}_{t}" for t in TASKS for m in CALIBRATION_METRICS]
    return names


def point_confusion(outcomes: Outcomes, task: str) -> np.ndarray:
    """The (classes, classes) confusion counts of ``task`` over its graded units."""
    target, pred = outcomes.targets[task], outcomes.preds[task]
    labelled = target != IGNORE_INDEX
    ones = np.ones((1, int(labelled.sum())))
    return _confusion(ones, target[labelled], pred[labelled], TASKS[task])[0].astype(int)


def point_metrics(outcomes: Outcomes) -> dict[str, float | None]:
    """`weighted_metrics` of the evaluated set itself (every unit once); None where undefined."""
    values = weighted_metrics(outcomes, np.ones((1, len(outcomes))))
    return {k: None if np.isnan(v[0]) else float(v[0]) for k, v in values.items()}


def bootstrap_samples(
    outcomes: Outcomes,
    units: Sequence[str] | None,
    resamples: int,
    seed: int,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """`weighted_metrics` of ``resamples`` seeded draws of ``units`` (None = the images): one
    value per draw and metric (NaN where undefined in that draw). ``names``: default
    `CI_METRICS`."""
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {resamples}")
    if units is None:
        num_units, unit_of = len(outcomes), np.arange(len(outcomes))
    else:
        # Unit k is the k-th patient id in sorted order (what `resample_indices` draws).
        index = {u: i for i, u in enumerate(sorted(set(units)))}
        num_units, unit_of = len(index), np.array([index[u] for u in units])
    draws = resample_indices(num_units, resamples, seed)
    counts = np.stack([np.bincount(row, minlength=num_units) for row in draws]).astype(float)
    values = weighted_metrics(outcomes, counts[:, unit_of])
    return {name: values[name] for name in (CI_METRICS if names is None else names)}


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """The central ``level`` percentile interval of the defined (non-NaN) samples."""
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    outcomes: Outcomes,
    units: Sequence[str] | None,
    resamples: int,
    seed: int,
    level: float = 0.95,
    names: Sequence[str] | None = None,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile-bootstrap interval of `weighted_metrics`, resampling ``units``.

    Args:
        outcomes: per-image outcomes.
        units: the resampling unit of each image (its patient id); None = the image itself.
        resamples: number of bootstrap draws.
        seed: seed of the draws (the same seed gives the same intervals).
        level: coverage of the interval (0.95 → the 2.5th and 97.5th percentiles).
        names: the metrics that get an interval; default `CI_METRICS`.

    A draw where a metric is undefined (e.g. no referable case drawn) is left out of that
    metric's percentiles; a metric undefined in every draw gets (None, None).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap level must be in (0, 1), got {level}")
    samples = bootstrap_samples(outcomes, units, resamples, seed, names)
    return {name: percentile_interval(values, level) for name, values in samples.items()}


def difference_intervals(
    first: tuple[Outcomes, Sequence[str] | None],
    second: tuple[Outcomes, Sequence[str] | None],
    resamples: int,
    seed: int,
    level: float = 0.95,
    names: Sequence[str] | None = None,
) -> dict[str, tuple[float | None, float | None, float | None]]:
    """(point, low, high) of ``second`` − ``first`` per metric: an unpaired bootstrap.

    Two different datasets share no images, so each is resampled on its own (``(outcomes,
    units)`` as in `bootstrap_intervals`, independent seeds) and the percentile interval is
    taken over the differences of the k-th draws. Undefined on either side: None.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap level must be in (0, 1), got {level}")
    a = bootstrap_samples(*first, resamples, seed, names)
    b = bootstrap_samples(*second, resamples, seed + 1, names)
    point_a, point_b = point_metrics(first[0]), point_metrics(second[0])
    out: dict[str, tuple[float | None, float | None, float | None]] = {}
    for name in a:
        pa, pb = point_a.get(name), point_b.get(name)
        point = None if pa is None or pb is None else pb - pa
        out[name] = (point, *percentile_interval(b[name] - a[name], level))
    return out
