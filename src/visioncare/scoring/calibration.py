"""Post-hoc calibration by temperature scaling (Guo et al. 2017), one temperature per task.

A network selected for accuracy is usually over-confident: its softmax says 0.95 where it is
right 80 % of the time. Dividing the logits by one fitted temperature T > 0 per task fixes most
of that without changing any predicted grade (the arg-max is the same for every T).

Probabilities are what every consumer holds (eval, predict, the ONNX path), so the temperature
is applied to them: ``softmax(log p / T)`` equals ``softmax(z / T)`` for the logits ``z`` that
gave ``p`` (log-softmax differs from ``z`` by a per-row constant, which the softmax removes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from visioncare import IGNORE_INDEX
from visioncare.errors import ConfigurationError
from visioncare.utils.checkpoint_file import update_checkpoint

log = logging.getLogger("visioncare")

CHECKPOINT_KEY = "visioncare_calibration"
# Temperatures seen in practice lie near 1-3 (Guo et al. 2017); beyond this range a fit says more
# about the model than about its confidence (see `fit_temperature`).
TEMPERATURE_RANGE = (0.05, 20.0)
# Probabilities are clamped before the log: a softmax in float32 can underflow to exactly 0.
_FLOOR = 1e-12


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """Probabilities (N, C) of the same logits divided by ``temperature``."""
    if temperature == 1.0:
        return probs
    log_probs = probs.double().clamp_min(_FLOOR).log()
    return torch.softmax(log_probs / temperature, dim=1).to(probs.dtype)


def calibrate(
    probs: Mapping[str, Tensor], temperatures: Mapping[str, float] | None
) -> dict[str, Tensor]:
    """Each task's probabilities with its temperature applied (none stored: unchanged)."""
    temperatures = temperatures or {}
    return {
        task: apply_temperature(p, float(temperatures.get(task, 1.0))) for task, p in probs.items()
    }


def fit_temperature(probs: Tensor, target: Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the negative log-likelihood of ``target`` (labelled rows).

    Optimised over log T (so T stays positive) with L-BFGS in float64; 1.0 when nothing is
    labelled. The objective is convex in 1/T, so the optimum is unique. Bounded to
    `TEMPERATURE_RANGE`: a model no better than chance on validation drives T towards infinity,
    which would flatten every probability until float32 ties change the predicted grade; such a
    fit is capped and logged (the model, not its calibration, needs work).
    """
    labelled = target != IGNORE_INDEX
    if not bool(labelled.any()):
        return 1.0
    log_probs = probs[labelled].double().clamp_min(_FLOOR).log()
    labels = target[labelled].long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_probs / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(log_t.detach().exp())
    low, high = TEMPERATURE_RANGE
    if not low <= fitted <= high:
        log.warning(
            "Fitted temperature %.3g is outside [%g, %g]: the validation split says this model "
            "is close to guessing (or certain); using %g",
            fitted, low, high, min(max(fitted, low), high),
        )  # fmt: skip
    return min(max(fitted, low), high)


METHODS = ("temperature", "none")


def check_method(value: object) -> str:
    """`calibration` as `temperature` or `none`, checked before training (not after it)."""
    method = "none" if value is None else str(value)
    if method not in METHODS:
        raise ConfigurationError(
            f"calibration={value!r} is not allowed; use calibration=temperature (fit one "
            "temperature per task on validation) or calibration=none"
        )
    return method


def nll(probs: Tensor, target: Tensor) -> float | None:
    """Mean negative log-likelihood of the labelled rows of ``target`` (None: none labelled)."""
    labelled = target != IGNORE_INDEX
    if not bool(labelled.any()):
        return None
    log_probs = probs[labelled].double().clamp_min(_FLOOR).log()
    return float(torch.nn.functional.nll_loss(log_probs, target[labelled].long()))


def fit_calibration(
    probs: Mapping[str, Tensor], targets: Mapping[str, Tensor], method: str
) -> dict[str, object]:
    """The calibration record of one run: method, temperature per task, NLL before/after.

    With ``method == "none"`` no temperature is fitted (the record still reports the NLL, so a
    run without calibration says how calibrated it happens to be).
    """
    temperatures: dict[str, float] = {}
    before: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    for task, p in probs.items():
        before[task] = nll(p, targets[task])
        if method == "temperature":
            temperatures[task] = fit_temperature(p, targets[task])
        after[task] = nll(apply_temperature(p, temperatures.get(task, 1.0)), targets[task])
    return {
        "method": method,
        "temperatures": temperatures or None,
        "val_nll_before": before,
        "val_nll_after": after,
    }


def checkpoint_entry(record: Mapping[str, object]) -> dict[str, object] | None:
    """What best.ckpt stores under `CHECKPOINT_KEY`: {"method", "dr": T, "dme": T}, or None."""
    temperatures = record.get("temperatures")
    if not temperatures:
        return None
    return {"method": record["method"], **dict(temperatures)}  # type: ignore[arg-type]


def temperatures_from(entry: Mapping[str, object] | None) -> dict[str, float] | None:
    """The per-task temperatures of a stored `CHECKPOINT_KEY` entry (None: not calibrated)."""
    if not entry:
        return None
    return {k: float(v) for k, v in entry.items() if k != "method"}  # type: ignore[arg-type]


def store_calibration(ckpt_path: str | Path, entry: Mapping[str, object] | None) -> None:
    """Write (or, for None, remove) the calibration entry of a checkpoint file, atomically."""
    update_checkpoint(ckpt_path, {CHECKPOINT_KEY: dict(entry) if entry else None})
