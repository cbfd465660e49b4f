"""`model_card.md`: what a trained model is, what it is for, and how good it is, from its records.

Every number in the card is read from the run's own records (summary.json, splits.csv, the
checkpoint's config, operating points and calibration), never typed by hand, so the card cannot
drift from the model. Training writes it in the run directory; export beside the exported model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visioncare.runs.splits import FILENAME as SPLITS_FILENAME
from visioncare.runs.splits import read_splits
from visioncare.utils.formatting import fmt_number

FILENAME = "model_card.md"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return fmt_number(value, missing="nan")  # the card's table is parsed back as floats
    return str(value)


def _table(rows: Mapping[str, Any]) -> list[str]:
    """A two-column markdown table; `metric | value` rows that a test can parse back."""
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_number(value)} |" for key, value in rows.items()]
    return lines


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _data_section(run_dir: Path | None, summary: Mapping[str, Any], config: Mapping) -> list[str]:
    lines = ["## Training data", ""]
    target = _select(config, "data._target_") or "unknown"
    lines.append(f"- Data module: `{target}`, root `{_select(config, 'data.root')}`")
    sizes = summary.get("data", {})
    lines.append("- Split sizes: " + ", ".join(f"{k} = {v}" for k, v in sizes.items()))
    path = run_dir / SPLITS_FILENAME if run_dir else None
    if path is None or not path.is_file():
        lines.append("- Per-image split record: not available")
        return [*lines, ""]
    rows = read_splits(path)
    lines.append(f"- Sources: {', '.join(sorted({r['source'] for r in rows}))}")
    lines += [
        "",
        "| split | images | patients | DR grades 0-4 | DME grades 0-2 |",
        "| --- " * 5 + "|",
    ]
    for split in sorted({r["split"] for r in rows}):
        chosen = [r for r in rows if r["split"] == split]
        patients = {f"{r['source']}/{r['patient']}" for r in chosen if r["patient"]}
        dr = Counter(r["dr"] for r in chosen)
        dme = Counter(r["dme"] for r in chosen)
        lines.append(
            f"| {split} | {len(chosen)} | {len(patients) or 'unknown'} | "
            f"{' / '.join(str(dr.get(str(g), 0)) for g in range(5))} | "
            f"{' / '.join(str(dme.get(str(g), 0)) for g in range(3))} |"
        )
    lines.append("")
    lines.append("Ungraded images (-1) are counted in the image total, not in a grade.")
    return [*lines, ""]


def render_model_card(
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    run_dir: Path | None = None,
    operating_points: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> str:
    """The card's markdown from a run's summary.json, its config and operating points."""
    model = summary.get("model", {})
    weights = model.get("weights", {})
    repro = summary.get("reproducibility", {}) or {}
    trainer = summary.get("trainer", {})
    synthetic = "synthetic" in str(_select(config, "data._target_") or "").lower()
    lines = ["# Model card: VisionCare DR/DME grader", ""]
    lines += ["## Model details", ""]
    lines.append(f"- Backbone: `{model.get('backbone')}` with a DR head (5 grades) and a DME head")
    lines.append(f"- Weights provenance: `{json.dumps(weights, sort_keys=True)}`")
    lines.append(
        f"- Recipe: loss `{_select(config, 'loss._target_')}`, "
        f"optimizer `{_select(config, 'model.optimizer._target_')}` "
        f"lr {_select(config, 'model.optimizer.lr')}, "
        f"weight decay {_select(config, 'model.optimizer.weight_decay')}, "
        f"unfreeze_step {_select(config, 'unfreeze_step')}, "
        f"max_epochs {_select(config, 'trainer.max_epochs')}, "
        f"image size {_select(config, 'data.image_size')}, seed {_select(config, 'seed')}"
    )
    lines.append(f"- Precision: {trainer.get('precision', _select(config, 'trainer.precision'))}")
    lines.append(f"- Commit: `{repro.get('git_commit')}` (dirty: {repro.get('git_dirty')})")
    packages = repro.get("packages", {}) or {}
    lines.append(
        f"- Python {repro.get('python')}; "
        + ", ".join(f"{name} {version}" for name, version in packages.items())
    )
    lines += ["", "## Intended use", ""]
    lines.append(
        "- Research on automated grading of diabetic retinopathy (ICDR 0-4) and diabetic "
        "macular edema (0-2) from colour fundus photographs."
    )
    lines.append(
        "- Out of scope: clinical diagnosis or screening decisions. This is **not a medical "
        "device**; it has no regulatory clearance and no prospective clinical validation."
    )
    if synthetic:
        lines.append(
            "- **Trained on synthetic images: a demonstration of the pipeline only.** Its "
            "numbers say nothing about real fundus photographs."
        )
    lines.append("")
    lines += _data_section(run_dir, summary, config)
    lines += ["## Evaluation", ""]
    best = dict(summary.get("best", {}))
    lines += [f"Validation (best epoch {best.pop('epoch', None)}):", ""]
    lines += [*_table(best), ""]
    lines += ["Test (best.ckpt):", ""]
    test = summary.get("test", {})
    lines += (_table(test) if test else ["No test metrics were recorded for this run."]) + [""]
    lines += ["Referable operating points (chosen on validation, calibrated probabilities):", ""]
    points = {}
    for task, point in (operating_points or {}).items():
        points[f"{task}/threshold"] = point.get("threshold")
        points[f"{task}/val_sensitivity"] = point.get("val_sensitivity")
        points[f"{task}/val_specificity"] = point.get("val_specificity")
    lines += (_table(points) if points else ["None stored: P(referable) >= 0.5 is used."]) + [""]
    calibration = summary.get("calibration") or {}
    lines += [f"Calibration (method: {calibration.get('method', 'none recorded')}):", ""]
    calib_rows: dict[str, Any] = {}
    for task, value in (calibration.get("temperatures") or {}).items():
        calib_rows[f"{task}/temperature"] = value
    for task, value in (calibration.get("val_nll_before") or {}).items():
        calib_rows[f"{task}/val_nll_before"] = value
    for task, value in (calibration.get("val_nll_after") or {}).items():
        calib_rows[f"{task}/val_nll_after"] = value
    lines += (_table(calib_rows) if calib_rows else ["Not calibrated."]) + [""]
    lines += ["## Quality limits", ""]
    lines.append(
        "- Metrics come from the splits above only; other cameras, populations and image "
        "quality may perform worse. Photos flagged not gradable by predict's `quality` / "
        "`gradable` columns should be re-taken, not trusted."
    )
    lines.append("- Intervals and subgroup results: see eval's metrics.json for this checkpoint.")
    lines += ["", "## How to reproduce", ""]
    lines += ["```", command or "python src/train.py", "```", ""]
    lines += ["The full config the run used:", "", "```json"]
    lines += [json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def training_command(run_dir: Path | None) -> str:
    """`python src/train.py` with the run's own overrides (Hydra's `.hydra/overrides.yaml`)."""
    overrides_path = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    overrides: list[str] = []
    if overrides_path is not None and overrides_path.is_file():
        import yaml

        overrides = [str(o) for o in (yaml.safe_load(overrides_path.read_text()) or [])]
    return " ".join(["python src/train.py", *overrides])


def write_model_card(
    path: Path,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    run_dir: Path | None = None,
    operating_points: Mapping[str, Any] | None = None,
) -> Path:
    """Render and write the card; returns its path."""
    card = render_model_card(summary, config, run_dir, operating_points, training_command(run_dir))
    path.write_text(card)
    return path
