"""PNG plots of a run: loss, accuracy and F1 curves from metrics.csv; confusion matrices."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

CURVES = {
    "loss": [
        "train/loss",
        "val/loss",
        "train/loss_dr",
        "val/loss_dr",
        "train/loss_dme",
        "val/loss_dme",
    ],
    "accuracy": ["train/acc_dr", "val/acc_dr", "train/acc_dme", "val/acc_dme", "val/avg_acc"],
    "f1": ["train/f1_dr", "val/f1_dr", "train/f1_dme", "val/f1_dme"],
}


def plot_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int, title: str, path: str | Path
) -> Path:
    """Reliability diagram: mean confidence against accuracy per confidence bin, one line per
    set of probabilities (e.g. calibrated and uncalibrated); the diagonal is perfect calibration.

    ``curves``: label → (probabilities (N, C), labels (N,)), labelled rows only.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for label, (probs, target) in curves.items():
        confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            members = which == b
            if members.any():
                xs.append(confidence[members].mean())
                ys.append((predicted[members] == target[members]).mean())
        ax.plot(xs, ys, "o-", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write as a 100-dpi PNG (creating the folder) and free the figure."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of metrics.csv as floats (empty cells dropped)."""
    with open(path, newline="") as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def plot_curves(rows: Sequence[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """`loss.png`, `accuracy.png`, `f1.png` against the epoch; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, columns in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for column in columns:
            points = [(r["epoch"], r[column]) for r in rows if column in r]
            if points:
                epochs, values = zip(*points, strict=True)
                style = "--" if column.startswith("train/") else "-"
                ax.plot(epochs, values, style, marker="o", markersize=3, label=column)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        written.append(_save(fig, out / f"{name}.png"))
    return written


def plot_confusion_matrix(
    matrix: np.ndarray, title: str, path: str | Path, class_names: Sequence[str] | None = None
) -> Path:
    """Counts with row-normalised shading (rows = true grade, columns = predicted)."""
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    names = list(class_names or [str(i) for i in range(n)])
    rows = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n))
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            color = "white" if shade[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color)
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc(
    fpr: np.ndarray,
    tpr: np.ndarray,
    auroc: float,
    title: str,
    path: str | Path,
    operating_point: dict[str, Any] | None = None,
) -> Path:
    """ROC curve with its AUROC, axes named as clinicians read them.

    ``operating_point`` (keys ``threshold``, ``sensitivity``, ``specificity`` and optionally
    ``*_ci_low``/``*_ci_high``) marks the decision the model applies, with its intervals as
    error bars: the curve says what is possible, the point what the clinic gets.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}")
    point = operating_point or {}
    sens, spec = point.get("sensitivity"), point.get("specificity")
    if sens is not None and spec is not None:
        x, y = 1 - spec, sens

        def span(name: str, value: float, flip: bool) -> list[float]:
            low, high = point.get(f"{name}_ci_low"), point.get(f"{name}_ci_high")
            if low is None or high is None:
                return [0.0, 0.0]
            return [high - value, value - low] if flip else [value - low, high - value]

        ax.errorbar(
            [x], [y],
            xerr=np.array(span("specificity", spec, True)).reshape(2, 1),
            yerr=np.array(span("sensitivity", sens, False)).reshape(2, 1),
            fmt="o", color="crimson", capsize=3,
            label=f"P >= {point['threshold']:.3f}: sens {sens:.2f}, spec {spec:.2f}",
        )  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_param_importances(importances: dict[str, float], metric: str, path: str | Path) -> Path:
    """Horizontal bars of an Optuna study's parameter importances, the largest on top."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (PED-ANOVA, sums to 1)")
    ax.set_title("Hyperparameter importances")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_search_history(trials: Sequence[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """Each trial's value by number (pruned: its last reported score, hollow), best so far."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [t for t in trials if t["state"] == "complete"]
    pruned = [t for t in trials if t["state"] == "pruned" and t["last_reported"]]
    if done:
        ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", label="complete")
        best, running = [], -np.inf
        for t in done:
            running = max(running, t["value"])
            best.append(running)
        ax.step([t["number"] for t in done], best, where="post", label="best so far")
    if pruned:
        xs = [t["number"] for t in pruned]
        ys = [t["last_reported"]["value"] for t in pruned]
        ax.plot(xs, ys, "o", mfc="none", color="tab:red", label="pruned (last epoch reported)")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)
