"""The evaluation report: metrics of one split from its probabilities, bootstrap intervals,
`metrics.json`, `predictions.csv`, `report.md`, plots and the printed table."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torchmetrics.classification import BinaryROC

from visioncare import IGNORE_INDEX, TASKS
from visioncare.scoring.bootstrap import (
    CALIBRATION_METRICS,
    CI_METRICS,
    ECE_BINS,
    Outcomes,
    bootstrap_intervals,
    difference_intervals,
    interval_names,
    outcomes_from_probs,
    patient_outcomes,
    point_confusion,
    point_metrics,
)
from visioncare.scoring.plots import plot_confusion_matrix, plot_reliability, plot_roc
from visioncare.scoring.referral import (
    REFERABLE_FROM,
    referable_score,
    referable_truth,
    threshold_for,
)
from visioncare.utils.formatting import fmt_interval, fmt_number

HEADLINE = ("avg_acc", "joint_acc", "acc_dr", "acc_dme", "f1_dr", "f1_dme", "qwk_dr", "qwk_dme")


def compute_metrics(
    probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    source_ids: Tensor,
    source_names: list[str],
    split: str = "test",
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """All per-image point metrics of the report, flat; None where undefined.

    Every number comes from `bootstrap.point_metrics`, the function whose resampled values give
    the intervals. ``thresholds``: task → operating threshold on P(referable) (default 0.5).
    """
    if thresholds is None:
        thresholds = {t: threshold_for(None, t) for t in TASKS}
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in probs.items()},
        {t: v.numpy() for t, v in targets.items()},
        thresholds,
    )
    out = _split_metrics(outcomes, split)
    for task in TASKS:
        out[f"{split}/referable_{task}_threshold"] = thresholds[task]
    if len(source_names) > 1:
        ids = source_ids.numpy()
        for index, name in enumerate(source_names):
            mask = ids == index
            if mask.any():
                subset = _select(outcomes, mask)
                out.update(_split_metrics(subset, f"{split}/{name}", grades_only=True))
    return out


def _select(outcomes: Outcomes, mask: np.ndarray) -> Outcomes:
    """The outcomes of the units in ``mask``."""
    return Outcomes(
        targets={t: v[mask] for t, v in outcomes.targets.items()},
        preds={t: v[mask] for t, v in outcomes.preds.items()},
        scores={t: v[mask] for t, v in outcomes.scores.items()},
        thresholds=outcomes.thresholds,
        probs=None if outcomes.probs is None else {t: v[mask] for t, v in outcomes.probs.items()},
    )


def _split_metrics(outcomes: Outcomes, prefix: str, grades_only: bool = False) -> dict[str, Any]:
    """`point_metrics` under ``prefix`` plus counts and confusion matrices.

    ``grades_only`` keeps the grading metrics (per source: no referable or calibration keys).
    A grade with no labelled sample gets a per-class accuracy of None (0/0), never 0.
    """
    out: dict[str, Any] = {}
    for name, value in point_metrics(outcomes).items():
        measure = name.split("_")[0]
        if grades_only and (measure == "referable" or measure in CALIBRATION_METRICS):
            continue
        out[f"{prefix}/{name}"] = value
    for task in TASKS:
        count = int((outcomes.targets[task] != IGNORE_INDEX).sum())
        out[f"{prefix}/num_{task}"] = float(count)
        out[f"{prefix}/confusion_{task}"] = (
            point_confusion(outcomes, task).tolist() if count else None
        )
    return out


def uncertainty_metrics(
    outcomes: Outcomes,
    patients: list[str],
    split: str,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """Bootstrap intervals of the headline metrics; per-patient metrics where patients are known.

    ``patients``: each image's patient (`Record.group`: the image itself where unknown).
    """
    known = _shares_patients(patients)
    units = patients if known else None
    out: dict[str, Any] = {}
    names = interval_names(outcomes)
    intervals = bootstrap_intervals(outcomes, units, resamples, seed, level, names)
    for name, (low, high) in intervals.items():
        out[f"{split}/{name}_ci_low"], out[f"{split}/{name}_ci_high"] = low, high
    if known:
        per_patient, ids = patient_outcomes(outcomes, units)
        prefix = f"{split}/patient"
        out[f"{prefix}/num_patients"] = len(ids)
        for name, value in point_metrics(per_patient).items():
            out[f"{prefix}/{name}"] = value
        intervals = bootstrap_intervals(per_patient, None, resamples, seed, level)
        for name, (low, high) in intervals.items():
            out[f"{prefix}/{name}_ci_low"], out[f"{prefix}/{name}_ci_high"] = low, high
    return out


def uncalibrated_metrics(
    raw_probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    patients: list[str],
    split: str,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """NLL, Brier and ECE of the raw (uncalibrated) probabilities with intervals, keys
    ``{split}/{measure}_{task}_uncalibrated``: the same function and the same bootstrap draws
    as the calibrated ones, so the two read side by side."""
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in raw_probs.items()},
        {t: v.numpy() for t, v in targets.items()},
        {t: threshold_for(None, t) for t in TASKS},
    )
    names = [f"{m}_{t}" for t in TASKS for m in CALIBRATION_METRICS]
    units = patients if _shares_patients(patients) else None
    point = point_metrics(outcomes)
    out: dict[str, Any] = {}
    for name, (low, high) in bootstrap_intervals(
        outcomes, units, resamples, seed, level, names
    ).items():
        key = f"{split}/{name}_uncalibrated"
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = point[name], low, high
    return out


# The subgroup table's columns in report.md.
SUBGROUP_COLUMNS = ("acc_dr", "acc_dme", "qwk_dr", "referable_dr_auroc", "ece_dr")


def data_groups(records: list) -> dict[str, list[str]]:
    """The groupings the data names (`Record.groups`: `data.group_columns`, the DICOM camera),
    column → each image's value; an image without the column is in ``unknown``. Columns in
    order of first appearance."""
    columns = list(dict.fromkeys(column for r in records for column, _ in r.groups))
    values = [dict(r.groups) for r in records]
    return {c: [v.get(c, "unknown") for v in values] for c in columns}


def groupings(records: list, gradable: list[bool] | None = None) -> dict[str, list[str]]:
    """Each grouping the records provide (column → each image's value): the source dataset
    always, laterality where any image has one (unknown eyes form the group ``unknown``), the
    gradable verdict where it was measured, and the data's own (`data_groups`)."""
    out = {"source": [r.source for r in records]}
    if any(r.laterality for r in records):
        out["laterality"] = [r.laterality or "unknown" for r in records]
    if gradable is not None:
        out["gradable"] = [str(g).lower() for g in gradable]
    out.update(data_groups(records))
    return out


def subset_metrics(
    outcomes: Outcomes,
    patients: list[str],
    mask: np.ndarray,
    prefix: str,
    min_size: int,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """``{prefix}/num`` and, from ``min_size`` images on, every metric with its interval, for
    the images in ``mask``. Intervals resample the subset's own patients."""
    out: dict[str, Any] = {f"{prefix}/num": int(mask.sum())}
    if mask.sum() < max(min_size, 1):
        return out
    subset = _select(outcomes, mask)
    members = [p for p, m in zip(patients, mask, strict=True) if m]
    units = members if _shares_patients(members) else None
    names = interval_names(subset)
    point = point_metrics(subset)
    intervals = bootstrap_intervals(subset, units, resamples, seed, level, names)
    for name in names:
        out[f"{prefix}/{name}"] = point[name]
        out[f"{prefix}/{name}_ci_low"], out[f"{prefix}/{name}_ci_high"] = intervals[name]
    return out


def subgroup_metrics(
    outcomes: Outcomes,
    records: list,
    split: str,
    min_size: int,
    resamples: int,
    seed: int,
    level: float = 0.95,
    gradable: list[bool] | None = None,
) -> dict[str, Any]:
    """Point values and intervals per subgroup, keys ``{split}/group/{column}={value}/{name}``.

    A group smaller than ``min_size`` images gets only its ``num`` (metrics on a handful of
    images would read as findings). Intervals resample the group's own patients.
    """
    out: dict[str, Any] = {}
    patients = [r.group for r in records]
    for column, values in groupings(records, gradable).items():
        for value in sorted(set(values)):
            mask = np.array([v == value for v in values])
            prefix = f"{split}/group/{column}={value}"
            out.update(
                subset_metrics(outcomes, patients, mask, prefix, min_size, resamples, seed, level)
            )
    return out


def gradable_metrics(
    outcomes: Outcomes,
    records: list,
    gradable: list[bool],
    split: str,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """The headline report again on the gradable photos alone: ``{split}/gradable/{name}`` with
    intervals and ``{split}/gradable/num`` (the rule is `visioncare.data.quality.is_gradable`).

    Beside the all-image numbers, not instead of them: a screening programme sees every photo,
    and the difference tells how much the ungradable ones cost."""
    patients = [r.group for r in records]
    mask = np.array(gradable, dtype=bool)
    return subset_metrics(outcomes, patients, mask, f"{split}/gradable", 1, resamples, seed, level)


# The external-validation table's columns (report.md): the headline metrics, with intervals.
VALIDATION_COLUMNS = (
    "acc_dr",
    "qwk_dr",
    "acc_dme",
    "referable_dr_auroc",
    "referable_dr_sensitivity",
    "referable_dr_specificity",
    "ece_dr",
)


def difference_metrics(
    reference: Outcomes,
    reference_patients: list[str],
    other: Outcomes,
    other_patients: list[str],
    prefix: str,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """``other`` − ``reference`` of every interval metric, keys ``{prefix}/{name}`` with
    ``_ci_low``/``_ci_high``: an unpaired bootstrap (`bootstrap.difference_intervals`; each side
    resamples its own patients, or images where patients are unknown)."""
    units = [p if _shares_patients(p) else None for p in (reference_patients, other_patients)]
    names = interval_names(reference)
    out: dict[str, Any] = {}
    for name, (point, low, high) in difference_intervals(
        (reference, units[0]), (other, units[1]), resamples, seed, level, names
    ).items():
        key = f"{prefix}/{name}"
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = point, low, high
    return out


def validation_section(
    metrics: dict[str, Any],
    rows: list[tuple[str, str, int]],
    differences: list[tuple[str, str]],
    note: str,
) -> list[str]:
    """report.md's external-validation table: one row per dataset (``(label, key prefix,
    images)``; a prefix without metrics shows "too few images"), then the differences to the
    reference row (``(label, key prefix)``), every cell ``value [low, high]``."""
    head = "| dataset | n | " + " | ".join(VALIDATION_COLUMNS) + " |"
    rule = "|---" * (len(VALIDATION_COLUMNS) + 2) + "|"
    lines = ["", "## External validation", "", note, "", head, rule]
    for label, prefix, count in rows:
        shown = [_fmt_ci(metrics, f"{prefix}/{m}") for m in VALIDATION_COLUMNS]
        if f"{prefix}/acc_dr" not in metrics:
            shown = ["(too few images)"] + [""] * (len(VALIDATION_COLUMNS) - 1)
        lines.append(f"| {label} | {count} | " + " | ".join(shown) + " |")
    if differences:
        lines += ["", "Difference to the reference row (dataset − reference):", ""]
        lines += [head.replace("| n |", "|"), "|---" * (len(VALIDATION_COLUMNS) + 1) + "|"]
        for label, prefix in differences:
            shown = [_fmt_ci(metrics, f"{prefix}/{m}") for m in VALIDATION_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return lines


def _shares_patients(patients: list[str]) -> bool:
    """Whether some images share a patient (otherwise per-patient equals per-image)."""
    return len(set(patients)) < len(patients)


def _has_patients(records: list) -> bool:
    return _shares_patients([r.group for r in records])


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2))


@dataclass
class EvaluatedSplit:
    """One evaluated dataset's rows of predictions.csv: its name, records and probabilities."""

    dataset: str
    records: list
    probs: dict[str, Tensor]
    targets: dict[str, Tensor]
    uncalibrated: dict[str, Tensor] | None = None


def write_split_predictions(path: Path, parts: list[EvaluatedSplit]) -> None:
    """predictions.csv of the evaluated datasets: dataset, image, source, patient, laterality,
    the data's group columns (`data_groups`), true/predicted grades and every probability (the
    clinic CSV of predict.py is `serving.predictor.write_predictions`).

    ``probs`` are the calibrated probabilities (what predict.py writes); ``uncalibrated``, when
    given, adds the raw ones as ``{task}_prob_{k}_uncalibrated``, so every reported number,
    calibrated or not, per dataset or subgroup, can be recomputed from this file alone.
    """
    group_columns = list(dict.fromkeys(c for part in parts for c in data_groups(part.records)))
    raw = any(part.uncalibrated is not None for part in parts)
    columns = ["dataset", "image", "source", "patient", "laterality", *group_columns]
    columns += ["dr_true", "dme_true", "dr_pred", "dme_pred"]
    columns += [f"{t}_prob_{k}" for t, n in TASKS.items() for k in range(n)]
    if raw:
        columns += [f"{t}_prob_{k}_uncalibrated" for t, n in TASKS.items() for k in range(n)]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for part in parts:
            preds = {t: p.argmax(dim=1) for t, p in part.probs.items()}
            for i, record in enumerate(part.records):
                groups = dict(record.groups)
                row = [part.dataset, str(record.image), record.source, record.patient]
                row += [record.laterality, *(groups.get(c, "unknown") for c in group_columns)]
                row += [int(part.targets["dr"][i]), int(part.targets["dme"][i])]
                row += [int(preds["dr"][i]), int(preds["dme"][i])]
                row += [float(v) for t in TASKS for v in part.probs[t][i].tolist()]
                if raw:
                    uncalibrated = part.uncalibrated or part.probs
                    row += [float(v) for t in TASKS for v in uncalibrated[t][i].tolist()]
                writer.writerow(row)


def reliability_diagrams(
    plots: Path,
    probs: dict[str, Tensor],
    uncalibrated: dict[str, Tensor] | None,
    targets: dict[str, Tensor],
    split: str,
    tasks: Sequence[str] = tuple(TASKS),
) -> list[Path]:
    """`reliability_{task}.png` per task with labels: the calibrated probabilities beside the
    raw ones (when given), on the split's labelled rows."""
    written = []
    for task in tasks:
        labelled = targets[task] != IGNORE_INDEX
        if not bool(labelled.any()):
            continue
        sets = {"calibrated": probs, **({"uncalibrated": uncalibrated} if uncalibrated else {})}
        curves = {
            name: (p[task][labelled].double().numpy(), targets[task][labelled].numpy())
            for name, p in sets.items()
        }
        title = f"Reliability, {task.upper()}, {split}"
        written.append(plot_reliability(curves, ECE_BINS, title, plots / f"reliability_{task}.png"))
    return written


def write_eval_plots(
    plots: Path,
    metrics: dict[str, Any],
    probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    split: str,
    uncalibrated: dict[str, Tensor] | None = None,
) -> list[Path]:
    """Confusion matrix and reliability diagram per task (calibrated and, when given, raw
    probabilities), and the ROC curve of referable DR / DME with its operating point."""
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for task, num_classes in TASKS.items():
        matrix = metrics.get(f"{split}/confusion_{task}")
        if matrix is not None:
            names = [f"{task.upper()} {k}" for k in range(num_classes)]
            target = plots / f"confusion_{task}.png"
            written.append(plot_confusion_matrix(matrix, f"{split} {task.upper()}", target, names))
        written += reliability_diagrams(plots, probs, uncalibrated, targets, split, [task])
        auroc = metrics.get(f"{split}/referable_{task}_auroc")
        if auroc is None:
            continue
        threshold = REFERABLE_FROM[task]
        labelled = targets[task] != IGNORE_INDEX
        truth = referable_truth(targets[task][labelled], task)
        score = referable_score(probs[task][labelled], task)
        fpr, tpr, _ = BinaryROC()(score, truth)
        title = f"Referable {task.upper()} (grade >= {threshold}), {split}"
        path = plots / f"roc_referable_{task}.png"
        key = f"{split}/referable_{task}"
        point = {
            name.removeprefix(f"{key}_"): metrics.get(name)
            for name in metrics
            if name.startswith(f"{key}_") and "/" not in name.removeprefix(f"{key}_")
        }
        written.append(plot_roc(fpr.numpy(), tpr.numpy(), auroc, title, path, point))
    return written


def _fmt_ci(metrics: dict[str, Any], key: str) -> str:
    """`value [low, high]` where the metric has a bootstrap interval, else the value alone."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    shown, interval = fmt_number(metrics.get(key)), fmt_interval(low, high, missing="")
    return f"{shown} {interval}" if interval else shown


def write_report(
    path: Path,
    metrics: dict[str, Any],
    split: str,
    facts: dict[str, str],
    plots: list[Path],
    sections: list[str] | None = None,
) -> None:
    """report.md: what was evaluated, ``sections`` (e.g. `validation_section`), then the
    metrics of the reference dataset per task as Markdown tables."""
    lines = ["# VisionCare evaluation", ""]
    lines += [
        f"- **{k}**: `{v}`" if k == "checkpoint" else f"- **{k}**: {v}" for k, v in facts.items()
    ]
    lines += sections or []
    header = ["| metric | value [95 % CI] |", "|---|---:|"]
    lines += ["", "## Overall", "", *header]
    for name in ("avg_acc", "joint_acc"):
        lines.append(f"| {name} | {_fmt_ci(metrics, f'{split}/{name}')} |")
    for task, num_classes in TASKS.items():
        lines += ["", f"## {task.upper()}", "", *header]
        names = ["acc", "f1", "qwk", "num"]
        names += [f"{m}{s}" for m in CALIBRATION_METRICS for s in ("", "_uncalibrated")]
        names += [f"per_class_acc_{task}_{k}" for k in range(num_classes)]
        for name in names:
            if name.startswith("per_class"):
                key = f"{split}/{name}"
            elif name.endswith("_uncalibrated"):
                key = f"{split}/{name.removesuffix('_uncalibrated')}_{task}_uncalibrated"
            else:
                key = f"{split}/{name}_{task}"
            value = metrics.get(key)
            shown = (
                str(int(value)) if name == "num" and value is not None else _fmt_ci(metrics, key)
            )
            lines.append(f"| {key.split('/', 1)[1]} | {shown} |")
        threshold = metrics.get(f"{split}/referable_{task}_threshold")
        shown = fmt_number(threshold)
        lines.append(f"| referable (>= {REFERABLE_FROM[task]}) threshold | {shown} |")
        for m in ("sensitivity", "specificity", "auroc"):
            key = f"{split}/referable_{task}_{m}"
            lines.append(f"| referable (>= {REFERABLE_FROM[task]}) {m} | {_fmt_ci(metrics, key)} |")
        matrix = metrics.get(f"{split}/confusion_{task}")
        if matrix is not None:
            lines += ["", "Confusion matrix (rows = true grade, columns = predicted):", ""]
            lines.append(
                "| true \\ pred | " + " | ".join(str(k) for k in range(num_classes)) + " |"
            )
            lines.append("|---" * (num_classes + 1) + "|")
            for k, row in enumerate(matrix):
                lines.append(f"| {k} | " + " | ".join(str(int(v)) for v in row) + " |")
    patients = metrics.get(f"{split}/patient/num_patients")
    if patients is not None:
        lines += ["", f"## Per patient ({patients} patients; a patient's grade is the worse eye's)"]
        lines += ["", *header]
        for name in CI_METRICS:
            lines.append(f"| {name} | {_fmt_ci(metrics, f'{split}/patient/{name}')} |")
    gradable = metrics.get(f"{split}/gradable/num")
    if gradable is not None:
        lines += ["", f"## Gradable photos only ({gradable} images; data.quality.is_gradable)"]
        lines += ["", *header]
        for name in CI_METRICS:
            lines.append(f"| {name} | {_fmt_ci(metrics, f'{split}/gradable/{name}')} |")
    group_prefix = f"{split}/group/"
    groups = sorted(
        {k.rsplit("/", 1)[0] for k in metrics if k.startswith(group_prefix) and k.endswith("/num")}
    )
    if groups:
        lines += ["", "## Subgroups", "", "| group | n | " + " | ".join(SUBGROUP_COLUMNS) + " |"]
        lines.append("|---" * (len(SUBGROUP_COLUMNS) + 2) + "|")
        for group in groups:
            shown = [_fmt_ci(metrics, f"{group}/{m}") for m in SUBGROUP_COLUMNS]
            if f"{group}/acc_dr" not in metrics:
                shown = ["(too few images)"] + [""] * (len(SUBGROUP_COLUMNS) - 1)
            name = group.split("/group/", 1)[1]
            lines.append(f"| {name} | {metrics[f'{group}/num']} | " + " | ".join(shown) + " |")
    per_source = sorted(
        {
            k.split("/")[1]
            for k in metrics
            if k.startswith(f"{split}/")
            and k.count("/") == 2
            and k.split("/")[1] not in ("patient", "group", "gradable")
        }
    )
    if per_source:
        lines += ["", "## Per source", "", "| source | " + " | ".join(HEADLINE) + " |"]
        lines.append("|---" * (len(HEADLINE) + 1) + "|")
        for source in per_source:
            values = [fmt_number(metrics.get(f"{split}/{source}/{m}")) for m in HEADLINE]
            lines.append(f"| {source} | " + " | ".join(values) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"- plots/{p.name}" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def print_table(metrics: dict[str, Any], split: str, console: Console | None = None) -> None:
    """The headline numbers, once, at the end of the run."""
    table = Table(title=f"VisionCare — {split} evaluation")
    table.add_column("metric")
    table.add_column(split, justify="right")
    table.add_column("95 % CI", justify="right")
    keys = [*HEADLINE, "ece_dr", "ece_dme"]
    keys += [
        f"referable_{t}_{m}"
        for t in TASKS
        for m in ("threshold", "sensitivity", "specificity", "auroc")
    ]
    for name in keys:
        key = f"{split}/{name}"
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        table.add_row(name, fmt_number(metrics.get(key)), fmt_interval(low, high, missing=""))
    (console or Console()).print(table)
