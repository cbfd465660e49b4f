"""Multi-task losses over the DR and DME heads.

`UncertaintyWeightedLoss` follows Kendall, Gal & Cipolla (2018): each task t owns a learnable
``s_t = log sigma_t^2`` (initialised at 0) and the total is

    L = sum_t  0.5 * exp(-s_t) * CE_t  +  0.5 * s_t
      = L_DR / (2 sigma_DR^2) + L_DME / (2 sigma_DME^2) + log sigma_DR + log sigma_DME

so a task whose loss stays high is down-weighted, and the ``+ 0.5 s_t`` term stops sigma growing
without bound. `FixedWeightLoss` is the ablation with hand-set weights.

A label of -1 means "not graded for this task" (APTOS has no DME): each task's cross-entropy is a
mean over its labelled samples only, and a batch with none contributes exactly 0 (never NaN), its
``0.5 * s_t`` regulariser included. Otherwise every ungraded batch would push ``s_t`` down: on a
DR-only set sigma_DME would fall without bound, and with datasets mixed the DME weight would be
inflated by 1/p (p = share of batches with a DME label). Both are written as tensor arithmetic
(no ``bool(mask.any())``), so a step never waits for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visioncare import IGNORE_INDEX, TASKS
from visioncare.errors import ConfigurationError


def masked_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy averaged over the samples whose label is not -1; 0 when there are none.

    A sum over the labelled samples divided by their count (their summed class weight when
    ``weight`` is given, as torch's mean does), clamped to 1: no boolean indexing and no host
    sync, and an all-unlabelled batch still reaches every head parameter (a zero gradient, which
    DDP needs).
    """
    labelled = target != IGNORE_INDEX
    total = F.cross_entropy(
        logits.float(),
        target,
        weight=weight,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    if weight is None:
        return total / labelled.sum().clamp_min(1)
    graded_weight = (weight[target.clamp_min(0)] * labelled).sum()
    return total / graded_weight.clamp_min(torch.finfo(graded_weight.dtype).tiny)


class _MultiTaskLoss(nn.Module):
    """Shared plumbing: per-task masked CE, optional per-class weights, label smoothing."""

    def __init__(
        self,
        tasks: dict[str, int] | None = None,
        class_weights: dict[str, list[float]] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks or TASKS)
        self.label_smoothing = label_smoothing
        for task, num_classes in self.tasks.items():
            weights = (class_weights or {}).get(task)
            if weights is not None and len(weights) != num_classes:
                raise ConfigurationError(
                    f"loss.class_weights.{task} has {len(weights)} values; "
                    f"task '{task}' has {num_classes} classes"
                )
            tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
            self.register_buffer(f"class_weight_{task}", tensor, persistent=False)

    def task_losses(
        self, logits: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return {
            task: masked_cross_entropy(
                logits[task],
                targets[task],
                weight=getattr(self, f"class_weight_{task}"),
                label_smoothing=self.label_smoothing,
            )
            for task in self.tasks
        }

    def task_sigmas(self) -> dict[str, Tensor]:
        """sigma_t per task, logged as `loss/sigma_{task}`."""
        raise NotImplementedError

    def forward(
        self, logits: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the total loss and the unweighted per-task losses."""
        raise NotImplementedError


class UncertaintyWeightedLoss(_MultiTaskLoss):
    """Kendall et al. (2018) homoscedastic-uncertainty weighting with learnable log-variances."""

    def __init__(
        self,
        tasks: dict[str, int] | None = None,
        class_weights: dict[str, list[float]] | None = None,
        label_smoothing: float = 0.0,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__(tasks, class_weights, label_smoothing)
        self.log_vars = nn.ParameterDict(
            {task: nn.Parameter(torch.tensor(float(init_log_var))) for task in self.tasks}
        )

    def task_sigmas(self) -> dict[str, Tensor]:
        return {task: torch.exp(0.5 * s.detach()) for task, s in self.log_vars.items()}

    def forward(
        self, logits: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        losses = self.task_losses(logits, targets)
        total = sum(
            # (graded > 0) as a tensor factor: a task without labels here adds nothing at all.
            (0.5 * torch.exp(-self.log_vars[task]) * loss + 0.5 * self.log_vars[task])
            * (targets[task] != IGNORE_INDEX).any()
            for task, loss in losses.items()
        )
        return total, losses


class FixedWeightLoss(_MultiTaskLoss):
    """Weighted sum of the task losses with constant weights (ablation of the learned weighting)."""

    def __init__(
        self,
        tasks: dict[str, int] | None = None,
        weights: dict[str, float] | None = None,
        class_weights: dict[str, list[float]] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(tasks, class_weights, label_smoothing)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise ConfigurationError(
                f"loss.weights names unknown tasks {sorted(unknown)}; use {list(self.tasks)}"
            )
        self.weights = {task: float(weights.get(task, 1.0)) for task in self.tasks}

    def task_sigmas(self) -> dict[str, Tensor]:
        # The equivalent sigma of a fixed weight w = 1 / (2 sigma^2).
        return {
            task: torch.tensor((0.5 / w) ** 0.5) if w > 0 else torch.tensor(float("inf"))
            for task, w in self.weights.items()
        }

    def forward(
        self, logits: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        losses = self.task_losses(logits, targets)
        total = sum(self.weights[task] * loss for task, loss in losses.items())
        return total, losses
