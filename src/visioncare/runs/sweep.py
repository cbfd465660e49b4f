"""A Hydra callback that ranks the jobs of a multirun sweep by their best `val/avg_acc`."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from visioncare.utils.formatting import fmt_number

log = logging.getLogger("visioncare")

COLUMNS = (
    "best/val/avg_acc",
    "best/val/joint_acc",
    "best/val/f1_dr",
    "best/val/f1_dme",
    "best/epoch",
    "test/avg_acc",
    "test/joint_acc",
    "test/qwk_dr",
)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per finished job: its overrides and key metrics from its summary.json."""
    rows = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        job_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides or [])}
        best, test = summary.get("best", {}), summary.get("test", {})
        for column in COLUMNS:
            section, _, key = column.partition("/")
            row[column] = (best if section == "best" else test).get(
                key if section == "best" else column
            )
        rows.append(row)

    def score(row: dict[str, Any]) -> float:
        value = row["best/val/avg_acc"]
        return -math.inf if value is None else value

    return sorted(rows, key=score, reverse=True)


def write_sweep_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """`sweep_summary.csv` and `sweep_summary.md` in the sweep directory, best job first."""
    rows = collect_jobs(sweep_dir)
    if not rows:
        return rows
    fields = ["rank", "job", "overrides", *COLUMNS]
    ranked = [{"rank": i + 1, **row} for i, row in enumerate(rows)]
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(ranked)

    def cell(value: Any) -> str:
        return fmt_number(value) if value is None or isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(cell(row[f]) for f in fields) + " |" for row in ranked]
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    return ranked


class SweepSummary(Callback):
    """Writes the sweep ranking when a multirun ends (`hydra.callbacks.sweep_summary`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        ranked = write_sweep_summary(sweep_dir)
        if ranked:
            log.info(
                "Sweep summary: %s (best: job %s)", sweep_dir / "sweep_summary.md", ranked[0]["job"]
            )
