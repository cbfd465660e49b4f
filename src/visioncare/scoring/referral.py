"""Referral decisions: one definition of "referable", and its operating point chosen on validation.

A screening programme refers a patient when the model says referable DR (ICDR grade >= 2) or
referable DME (grade >= 1). Everywhere in VisionCare (eval's sensitivity/specificity, predict's
`referable_dr`) the decision is the same: P(referable) = the summed softmax of the referable
grades, compared with a threshold, ``P(referable) >= threshold``.

The threshold is chosen on the validation split, at the end of training with the best weights,
as the highest one whose sensitivity reaches a target (default 0.85: the pre-specified
sensitivity endpoint of the pivotal trial of an autonomous DR screening system, Abràmoff et al.
2018, which reached 0.87 at specificity 0.91). It is stored in the checkpoint
(`visioncare_operating_points`) so eval reports test performance at it and predict applies it.
A checkpoint without one (or a validation split without referable cases) falls back to 0.5.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from visioncare import IGNORE_INDEX
from visioncare.errors import ConfigurationError
from visioncare.utils.checkpoint_file import update_checkpoint

log = logging.getLogger("visioncare")

# The lowest grade that counts as "referable" (needs an ophthalmologist) per task.
REFERABLE_FROM = {"dr": 2, "dme": 1}
DEFAULT_THRESHOLD = 0.5
DEFAULT_TARGET_SENSITIVITY = 0.85
CHECKPOINT_KEY = "visioncare_operating_points"


def referable_score(prob: Tensor, task: str) -> Tensor:
    """P(referable) per image from a task's softmax (N, C): the summed referable grades."""
    return prob[:, REFERABLE_FROM[task] :].sum(dim=1)


def referable_truth(target: Tensor, task: str) -> Tensor:
    """1 for a referable grade, 0 below it (ungraded -1 entries must be removed beforehand)."""
    return (target >= REFERABLE_FROM[task]).long()


def choose_threshold(score: Tensor, truth: Tensor, target_sensitivity: float) -> float | None:
    """The highest threshold t with sensitivity(score >= t) >= target, or None without positives.

    The k-th highest positive score, k = ceil(target * positives): every threshold above it
    misses more than the allowed share of referable eyes.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    positives = score[truth == 1].double().sort(descending=True).values
    if positives.numel() == 0:
        return None
    k = max(1, math.ceil(target_sensitivity * positives.numel() - 1e-9))
    return float(positives[k - 1])


def operating_points(
    probs: dict[str, Tensor], targets: dict[str, Tensor], target_sensitivity: float
) -> dict[str, dict[str, Any]]:
    """Per task with referable labels: the chosen threshold and what it reaches on this split."""
    points: dict[str, dict[str, Any]] = {}
    for task in REFERABLE_FROM:
        labelled = targets[task] != IGNORE_INDEX
        score = referable_score(probs[task][labelled], task)
        truth = referable_truth(targets[task][labelled], task)
        threshold = choose_threshold(score, truth, target_sensitivity)
        if threshold is None:
            continue
        decision = score >= threshold
        negatives = int((truth == 0).sum())
        points[task] = {
            "threshold": threshold,
            "target_sensitivity": target_sensitivity,
            "val_sensitivity": float(decision[truth == 1].float().mean()),
            "val_specificity": (
                float((~decision[truth == 0]).float().mean()) if negatives else None
            ),
            "num_val": int(labelled.sum()),
        }
    return points


def threshold_for(points: dict[str, Any] | None, task: str) -> float:
    """The stored threshold of ``task``, or 0.5 when the checkpoint has none."""
    point = (points or {}).get(task)
    return float(point["threshold"]) if point else DEFAULT_THRESHOLD


def store_operating_points(ckpt_path: str | Path, points: dict[str, dict[str, Any]]) -> None:
    """Add the operating points to an existing checkpoint file (atomically replaced)."""
    update_checkpoint(ckpt_path, {CHECKPOINT_KEY: points})


def check_target_sensitivity(value: Any) -> float:
    """`target_sensitivity` as a float in (0, 1], checked before training (not after it)."""
    if value is None:
        return DEFAULT_TARGET_SENSITIVITY
    try:
        target = float(value)
    except (TypeError, ValueError):
        target = float("nan")
    if not 0.0 < target <= 1.0:
        raise ConfigurationError(
            f"target_sensitivity={value!r} is not allowed; give the sensitivity the referable "
            "operating point must reach on validation as a fraction in (0, 1], e.g. 0.85"
        )
    return target
