"""`model_card.md`: what a trained model is, what it is for, and how good it is, from its records.

Every number in the card is read from the run's own records (summary.json, splits.csv, the
checkpoint's config, operating points and calibration), never typed by hand, so the card cannot
drift from the model. The test evaluation is summary.json's `test_report` (eval.py's metrics of
the calibrated best weights, with bootstrap intervals and subgroups, keys as in eval's
metrics.json). Training writes the card in the run directory; export beside the exported model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visioncare import TASKS
from visioncare.runs.splits import FILENAME as SPLITS_FILENAME
from visioncare.runs.splits import read_splits
from visioncare.scoring.report import SUBGROUP_COLUMNS
from visioncare.utils.formatting import fmt_interval, fmt_number

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


def _interval_table(metrics: Mapping[str, Any], keys: list[str], level: float) -> list[str]:
    """A `metric | value | 95% interval` table of eval-named ``keys`` (parsed back by tests)."""
    lines = [f"| metric | value | {level:.0%} interval |", "| --- | --- | --- |"]
    for key in keys:
        interval = fmt_interval(metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high"))
        value = metrics.get(key)
        lines.append(
            f"| {key} | {_number(float('nan') if value is None else value)} | {interval} |"
        )
    return lines


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    """`value [low, high]`, or the value alone where it has no interval."""
    interval = fmt_interval(metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high"))
    value = _number(metrics.get(key))
    return value if interval == fmt_interval(None, None) else f"{value} {interval}"


def _test_section(report: Mapping[str, Any], operating_points: Mapping[str, Any] | None) -> list:
    """The test evaluation of summary.json's `test_report`: headline metrics, the referable
    decisions at the stored operating points, calibration before/after, subgroups."""
    metrics = report.get("metrics", {})
    boot = report.get("bootstrap", {})
    level = float(boot.get("level", 0.95))
    settings = (
        f"{boot.get('level', 0.95):.0%} percentile bootstrap, {boot.get('resamples')} resamples "
        f"of {report.get('unit', 'images')} (seed {boot.get('seed')})"
    )
    lines = [
        f"Test ({report.get('images')} images; best.ckpt with its calibration; keys as in eval's "
        f"metrics.json; intervals: {settings}):",
        "",
    ]
    headline = ["test/avg_acc", "test/joint_acc"]
    headline += [f"test/{m}_{t}" for t in TASKS for m in ("acc", "f1", "qwk")]
    headline += [f"test/referable_{t}_auroc" for t in TASKS]
    lines += [*_interval_table(metrics, headline, level), ""]
    tasks = [t for t in TASKS if f"test/referable_{t}_threshold" in metrics]
    stored = "chosen on validation" if operating_points else "none stored: 0.5"
    lines += [f"Referable decisions on test at the operating points ({stored}):", ""]
    keys = [
        f"test/referable_{t}_{m}"
        for t in tasks
        for m in ("threshold", "sensitivity", "specificity")
    ]
    lines += [*_interval_table(metrics, keys, level), ""]
    lines += ["Test calibration, before (`_uncalibrated`: raw softmax) and after:", ""]
    keys = [
        f"test/{m}_{t}{s}"
        for t in tasks
        for m in ("nll", "brier", "ece")
        for s in ("_uncalibrated", "")
    ]
    lines += [*_interval_table(metrics, keys, level), ""]
    min_size = report.get("subgroups_min_size")
    groups = sorted(
        k.removesuffix("/num")
        for k in metrics
        if k.startswith("test/group/") and k.endswith("/num")
    )
    lines += [
        f"Test subgroups (`test/group/<column>=<value>/...`; a group under {min_size} images "
        "is listed with its count only):",
        "",
        "| group | n | " + " | ".join(SUBGROUP_COLUMNS) + " |",
        "| --- " * (len(SUBGROUP_COLUMNS) + 2) + "|",
    ]
    for group in groups:
        cells = [_cell(metrics, f"{group}/{m}") for m in SUBGROUP_COLUMNS]
        if f"{group}/acc_dr" not in metrics:
            cells = [f"count only (< {min_size} images)"] + [""] * (len(SUBGROUP_COLUMNS) - 1)
        name = group.removeprefix("test/group/")
        lines.append(f"| {name} | {metrics[f'{group}/num']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


FULL_PRECISION = ("32-true", "32", "64-true", "64")


def _precision_note(
    loop: Mapping[str, Any], report: Mapping[str, Any], precision: Any
) -> list[str]:
    """Where Lightning's test loop (at the training precision) disagrees with the report's
    full-precision numbers, say so and show both: a near-tie decided differently in bf16 changes
    a grade, and a reader comparing the console table with the card should know why."""
    differing = [
        key
        for key, value in loop.items()
        if isinstance(value, (int, float))
        and isinstance(report.get(key), (int, float))
        and abs(float(value) - float(report[key])) > 1e-6
    ]
    if not differing:
        return []
    listed = ", ".join(
        f"{key} {fmt_number(float(loop[key]))} (here {fmt_number(float(report[key]))})"
        for key in differing
    )
    if str(precision) in FULL_PRECISION:
        # Same precision: the loop ran the module as trained (compiled, channels-last, TF32 or
        # cuDNN autotuning on a GPU) against a fresh fp32 load of best.ckpt.
        why = "the trained module's kernels decided a near-tie between two grades differently."
    else:
        why = "reduced precision decided a near-tie between two grades differently."
    return [
        f"The numbers above are full-precision (fp32) inference, as eval.py, predict.py and the "
        f"ONNX export compute them. Lightning's test loop ran at the training precision "
        f"({precision}) and gave {listed} (summary.json `test`, the printed table): {why}",
        "",
    ]


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
    digest = (summary.get("splits") or {}).get("sha256")
    lines.append(f"- {SPLITS_FILENAME} sha256: `{digest or 'not recorded'}`")
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
    # The test split last: scored once, with the operating points and calibration above.
    test = summary.get("test", {})
    if summary.get("test_report"):
        lines += _test_section(summary["test_report"], operating_points)
        lines += _precision_note(
            test, summary["test_report"].get("metrics", {}), trainer.get("precision")
        )
    elif test:  # no best.ckpt to report on, or a run from before the test report
        title = "Test (Lightning's test loop, no intervals; this run recorded no test report):"
        lines += [title, "", *_table(test), ""]
    else:
        lines += [
            "No test evaluation was recorded for this run (test=false, or no test split).",
            "",
        ]
    lines += ["## Quality limits", ""]
    lines.append(
        "- Metrics come from the splits above only; other cameras, populations and image "
        "quality may perform worse. Photos flagged not gradable by predict's `quality` / "
        "`gradable` columns should be re-taken, not trusted."
    )
    lines.append(
        "- The test numbers above cover every test photo: photo quality (gradable) was not "
        "assessed for them; `python src/eval.py ckpt_path=<this checkpoint>` adds the gradable "
        "subset, the confusion matrices and predictions.csv."
    )
    lines.append(
        "- A subgroup's interval is wide on few images; groups under the minimum size have no "
        "metrics at all, and their performance is unknown, not good."
    )
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
