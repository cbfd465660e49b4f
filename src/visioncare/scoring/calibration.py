"""Post-hoc calibration by temperature scaling (Guo et al. 2017), one temperature per task.

A network selected for accuracy is usually over-confident: its softmax says 0.95 where it is
right 80 % of the time. Dividing the logits by one fitted temperature T > 0 per task fixes most
of that without changing any predicted grade (the arg-max is the same for every T).

Probabilities are what every consumer holds (eval, predict, the ONNX path), so the temperature
is applied to them: ``softmax(log p / T)`` equals ``softmax(z / T)`` for the logits ``z`` that
gave ``p`` (log-softmax differs from ``z`` by a per-row constant, which the softmax removes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from visioncare import IGNORE_INDEX

CHECKPOINT_KEY = "visioncare_calibration"
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
    labelled. The objective is convex in 1/T, so the optimum is unique.
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
    return float(log_t.detach().exp())
