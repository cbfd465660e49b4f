"""What a finished run leaves for people: summary.json, plots and a printed table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visioncare import DME_CLASSES, DR_CLASSES
from visioncare.scoring.plots import plot_confusion_matrix, plot_curves, read_metrics_csv
from visioncare.utils.formatting import fmt_number

HEADLINE_METRICS = (
    "avg_acc",
    "joint_acc",
    "acc_dr",
    "acc_dme",
    "f1_dr",
    "f1_dme",
    "qwk_dr",
    "qwk_dme",
)


def _json_number(value: Any) -> Any:
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


def write_summary(
    path: Path,
    best_epoch: int,
    best_metrics: Mapping[str, float],
    test_metrics: Mapping[str, float],
    sizes: Mapping[str, int],
    model: Mapping[str, Any] | None = None,
    trainer: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json: the best validation epoch, the test metrics, the split sizes and the model.

    ``model`` names the backbone and the provenance of the weights training started from;
    ``trainer`` the precision and cudnn.benchmark that ran (not `auto`); ``extra`` further
    top-level records (e.g. `calibration`: temperatures and validation NLL before/after).
    """
    summary = {
        "best": {"epoch": best_epoch, **{k: _json_number(v) for k, v in best_metrics.items()}},
        "test": {k: _json_number(v) for k, v in test_metrics.items()},
        "data": dict(sizes),
        "model": dict(model or {}),
        "trainer": dict(trainer or {}),
        **dict(extra or {}),
    }
    path.write_text(json.dumps(summary, indent=2, sort_keys=False))
    return summary


def write_plots(
    output_dir: Path, confusion: Mapping[str, Mapping[str, Any]], metrics_csv: Path
) -> list[Path]:
    """Curves from metrics.csv and one confusion matrix per evaluated split and task."""
    plots = output_dir / "plots"
    written = plot_curves(read_metrics_csv(metrics_csv), plots) if metrics_csv.exists() else []
    names = {
        "dr": [f"DR {i}" for i in range(DR_CLASSES)],
        "dme": [f"DME {i}" for i in range(DME_CLASSES)],
    }
    for split, tasks in confusion.items():
        for task, matrix in tasks.items():
            title = f"{split} {task.upper()}"
            target = plots / f"confusion_{split}_{task}.png"
            written.append(plot_confusion_matrix(matrix.numpy(), title, target, names.get(task)))
    return written


def print_summary_table(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Best validation and test metrics side by side."""
    best, test = summary["best"], summary["test"]
    table = Table(title=f"VisionCare — best epoch {best.get('epoch')}")
    table.add_column("metric")
    table.add_column("val (best)", justify="right")
    table.add_column("test", justify="right")
    for name in HEADLINE_METRICS:
        val, tested = best.get(f"val/{name}"), test.get(f"test/{name}")
        table.add_row(name, fmt_number(val), fmt_number(tested))
    (console or Console()).print(table)
