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
from torchmetrics import Metric
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


class _TaskMetrics(nn.Module):
    """The metric set of one task (accuracy, macro-F1 and the confusion counts when not ``full``).

    Without ``full`` (training) the inputs are not validated: torchmetrics' checks read values
    back to the host, a GPU synchronisation at every step.
    """

    def __init__(self, num_classes: int, full: bool = True) -> None:
        super().__init__()
        kwargs = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX, "validate_args": full}
        self.acc = MulticlassAccuracy(average="micro", **kwargs)
        self.f1 = MulticlassF1Score(average="macro", **kwargs)
        self.confusion = MulticlassConfusionMatrix(**kwargs)
        if full:
            self.per_class_acc = MulticlassAccuracy(average=None, **kwargs)
            self.qwk = MulticlassCohenKappa(weights="quadratic", **kwargs)

    def labelled(self) -> int:
        """Graded samples seen so far (all DDP ranks together); ungraded (-1) ones are ignored."""
        if not self.confusion.update_called:
            return 0
        return int(self.confusion.compute().sum())


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
        self.per_task = nn.ModuleDict({t: _TaskMetrics(n, full) for t, n in self.tasks.items()})
        self.joint = JointAccuracy()

    def update(self, logits: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        # No host-side checks here (they would synchronise a GPU every step): ungraded samples
        # are dropped by each metric's ignore_index, and `compute` reports NaN for a task whose
        # confusion matrix stayed empty.
        preds = {t: logits[t].argmax(dim=1) for t in self.tasks}
        for task, metrics in self.per_task.items():
            for metric in metrics.children():
                metric.update(preds[task], targets[task])
        self.joint.update(preds, targets)

    def compute(self) -> dict[str, float]:
        """Flat `{split}/{metric}_{task}` → value (NaN for a task without labels)."""
        split, out = self.split, {}
        accs = []
        for task, metrics in self.per_task.items():
            # How many graded images the split's metrics cover (all ranks together under DDP).
            count = metrics.labelled()
            labelled = count > 0
            nan = float("nan")
            acc = float(metrics.acc.compute()) if labelled else nan
            out[f"{split}/acc_{task}"] = acc
            out[f"{split}/f1_{task}"] = float(metrics.f1.compute()) if labelled else nan
            if self.full:
                qwk = _finite_kappa(metrics.qwk.compute()) if labelled else nan
                out[f"{split}/qwk_{task}"] = qwk
                per_class = metrics.per_class_acc.compute() if labelled else None
                for k in range(self.tasks[task]):
                    value = float(per_class[k]) if per_class is not None else nan
                    out[f"{split}/per_class_acc_{task}_{k}"] = value
            if labelled:
                accs.append(acc)
            out[f"{split}/num_{task}"] = float(count)
        out[f"{split}/avg_acc"] = sum(accs) / len(accs) if accs else float("nan")
        out[f"{split}/joint_acc"] = float(self.joint.compute())
        return out

    def confusion_matrices(self) -> dict[str, Tensor]:
        """Task → (C, C) confusion matrix, rows = true grade, columns = predicted grade."""
        return {t: m.confusion.compute().cpu() for t, m in self.per_task.items()}

    def reset(self) -> None:
        for metrics in self.per_task.values():
            for metric in metrics.children():
                metric.reset()
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
