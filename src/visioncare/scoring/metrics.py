"""Classification metrics for both tasks, built on torchmetrics (DDP-synchronised).

Names follow the contract `{split}/{metric}_{task}`: `acc`, `f1` (macro), `qwk` (quadratic weighted
kappa), `per_class_acc_{task}_{k}` (recall of grade k), `num` (graded images counted), plus
`{split}/avg_acc` (mean of the tasks' accuracies) and `{split}/joint_acc` (both grades right; the
IDRiD challenge metric). Labels of -1
("not graded") are ignored; a task with no labelled sample in the split reports NaN, not 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from visioncare import IGNORE_INDEX, TASKS


class JointAccuracy(Metric):
    """Share of samples whose every task is predicted right, over samples labelled for all tasks."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        tasks = list(targets)
        labelled = torch.stack([targets[t] != IGNORE_INDEX for t in tasks]).all(dim=0)
        right = torch.stack([preds[t] == targets[t] for t in tasks]).all(dim=0)
        self.correct += (right & labelled).sum()
        self.total += labelled.sum()

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"))
        return self.correct.float() / self.total


def task_metric_collection(num_classes: int, full: bool = True) -> MetricCollection:
    """One task's metrics as a torchmetrics `MetricCollection` with compute groups.

    Metrics whose states coincide after the first update share one state and one update
    (macro-F1 with per-class recall; the confusion matrix with kappa), so a batch costs three
    updates, not five. Without ``full`` (training: accuracy, macro-F1, confusion counts) inputs
    are not validated: torchmetrics' checks read values back to the host, a GPU sync per step.
    """
    kwargs = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX, "validate_args": full}
    metrics: dict[str, Metric] = {
        "acc": MulticlassAccuracy(average="micro", **kwargs),
        "f1": MulticlassF1Score(average="macro", **kwargs),
        "confusion": MulticlassConfusionMatrix(**kwargs),
    }
    if full:
        metrics["per_class_acc"] = MulticlassAccuracy(average=None, **kwargs)
        metrics["qwk"] = MulticlassCohenKappa(weights="quadratic", **kwargs)
    return MetricCollection(metrics, compute_groups=True)


class MultiTaskMetrics(nn.Module):
    """All metrics of one split (train, val or test) for every task.

    Args:
        split: prefix of the metric names.
        tasks: task name → number of classes.
        full: all metrics; False keeps accuracy, macro-F1 and joint accuracy, without input
            validation (cheap enough for every training step).
    """

    def __init__(self, split: str, tasks: dict[str, int] | None = None, full: bool = True) -> None:
        super().__init__()
        self.split = split
        self.full = full
        self.tasks = dict(tasks or TASKS)
        self.per_task = nn.ModuleDict(
            {t: task_metric_collection(n, full) for t, n in self.tasks.items()}
        )
        self.joint = JointAccuracy()

    @property
    def update_called(self) -> bool:
        """Whether anything was added since the last reset."""
        return self.joint.update_called

    def update(self, logits: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        # No host-side checks here (they would synchronise a GPU every step): ungraded samples
        # are dropped by each metric's ignore_index, and `compute` reports NaN for a task whose
        # confusion matrix stayed empty.
        preds = {t: logits[t].argmax(dim=1) for t in self.tasks}
        for task, metrics in self.per_task.items():
            metrics.update(preds[task], targets[task])
        self.joint.update(preds, targets)

    def compute(self) -> dict[str, float]:
        """Flat `{split}/{metric}_{task}` → value (NaN for a task without labels)."""
        split, out = self.split, {}
        accs = []
        nan = float("nan")
        for task, metrics in self.per_task.items():
            values = metrics.compute()  # synchronised over DDP ranks by torchmetrics
            # How many graded images the split's metrics cover (all ranks together).
            count = int(values["confusion"].sum())
            labelled = count > 0
            acc = float(values["acc"]) if labelled else nan
            out[f"{split}/acc_{task}"] = acc
            out[f"{split}/f1_{task}"] = float(values["f1"]) if labelled else nan
            if self.full:
                out[f"{split}/qwk_{task}"] = _finite_kappa(values["qwk"]) if labelled else nan
                for k in range(self.tasks[task]):
                    value = float(values["per_class_acc"][k]) if labelled else nan
                    out[f"{split}/per_class_acc_{task}_{k}"] = value
            if labelled:
                accs.append(acc)
            out[f"{split}/num_{task}"] = float(count)
        out[f"{split}/avg_acc"] = sum(accs) / len(accs) if accs else nan
        out[f"{split}/joint_acc"] = float(self.joint.compute())
        return out

    def confusion_matrices(self) -> dict[str, Tensor]:
        """Task → (C, C) confusion matrix, rows = true grade, columns = predicted grade."""
        return {t: m["confusion"].compute().cpu() for t, m in self.per_task.items()}

    def reset(self) -> None:
        for metrics in self.per_task.values():
            metrics.reset()
        self.joint.reset()


def _finite_kappa(value: Tensor) -> float:
    """Kappa is undefined (NaN) when both raters use a single class: report no agreement (0)."""
    kappa = float(value)
    return 0.0 if math.isnan(kappa) else kappa


def mean_f1(metrics: dict[str, float], split: str, tasks: dict[str, int] | None = None) -> float:
    """Mean macro-F1 over the tasks that have labels (the tie-breaker for model selection)."""
    values = [metrics.get(f"{split}/f1_{t}", float("nan")) for t in (tasks or TASKS)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
