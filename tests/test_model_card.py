"""model_card.md: generated from the run's own records (numbers, provenance, commit)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SYNTHETIC_OVERRIDES, TINY_OVERRIDES, compose_run
from visioncare import TASKS
from visioncare.data.records import Record
from visioncare.errors import ConfigurationError
from visioncare.runs.model_card import FILENAME, render_model_card
from visioncare.scoring.calibration import calibrate
from visioncare.scoring.evaluation import IntervalSettings, score_split
from visioncare.scoring.report import SUBGROUP_COLUMNS
from visioncare.tasks.evaluate import run as evaluate
from visioncare.tasks.train import run as train


def _table_values(card: str) -> dict[str, str]:
    """`| metric | value |` rows of the card, parsed back."""
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card, flags=re.MULTILINE))


@pytest.mark.slow
def test_training_card_carries_the_runs_numbers(tiny_checkpoint):
    run_dir = tiny_checkpoint.parents[1]
    card = (run_dir / FILENAME).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    values = _table_values(card)
    for key, value in summary["best"].items():
        if key != "epoch" and isinstance(value, float):
            assert float(values[key]) == pytest.approx(value, abs=1e-4)
    for task, temperature in summary["calibration"]["temperatures"].items():
        assert float(values[f"{task}/temperature"]) == pytest.approx(temperature, abs=1e-4)
        after = summary["calibration"]["val_nll_after"][task]
        assert float(values[f"{task}/val_nll_after"]) == pytest.approx(after, abs=1e-4)
    points = torch.load(tiny_checkpoint, weights_only=True)["visioncare_operating_points"]
    for task, point in points.items():
        assert float(values[f"{task}/threshold"]) == pytest.approx(point["threshold"], abs=1e-4)
    provenance = json.dumps(summary["model"]["weights"], sort_keys=True)
    assert provenance in card
    assert summary["reproducibility"]["git_commit"] in card
    assert "not a medical device" in card and "synthetic" in card.lower()
    sizes = summary["data"]
    assert f"train = {sizes['num_train']}" in card or f"num_train = {sizes['num_train']}" in card
    assert "python src/train.py" in card


# ------------------------------------------------------------------ the test evaluation
def _interval_rows(card: str) -> dict[str, tuple[float, str]]:
    """`| metric | value | 95% interval |` rows of the card, parsed back (value, interval)."""
    rows = re.findall(r"^\| (test/[^|]+?) \| ([^|]+?) \| ([^|]+?) \|$", card, flags=re.MULTILINE)
    return {key: (float(value), interval) for key, value, interval in rows}


def _interval(text: str) -> tuple[float, float] | None:
    found = re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", text.strip())
    return None if found is None else (float(found[1]), float(found[2]))


def _close(card_value: float, value: float | None) -> bool:
    if value is None:
        return math.isnan(card_value)
    return card_value == pytest.approx(value, abs=1e-4)


def _subgroup_rows(card: str) -> dict[str, list[str]]:
    """The card's subgroup table: group → [n, cells...] (cells `value [low, high]`)."""
    head = "| group | n | " + " | ".join(SUBGROUP_COLUMNS) + " |"
    lines = card.split(head, 1)[1].strip().splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def check_card_against_report(card: str, report: dict) -> None:
    """Every test number the card shows is summary.json's `test_report`, intervals included."""
    metrics = report["metrics"]
    rows = _interval_rows(card)
    assert {"test/avg_acc", "test/referable_dr_sensitivity", "test/nll_dr_uncalibrated"} <= set(
        rows
    )
    for key, (value, interval) in rows.items():
        assert _close(value, metrics[key]), key
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        if low is None:
            assert _interval(interval) is None, key
        else:
            assert _interval(interval) == pytest.approx((low, high), abs=1e-4), key
    groups = _subgroup_rows(card)
    expected = {k[len("test/group/") : -len("/num")] for k in metrics if k.endswith("/num")}
    expected = {g for g in expected if "/" not in g}
    assert set(groups) == expected and groups
    for group, (count, *cells) in groups.items():
        prefix = f"test/group/{group}"
        assert int(count) == metrics[f"{prefix}/num"]
        if f"{prefix}/acc_dr" not in metrics:
            assert cells[0].startswith("count only"), group
            continue
        for name, cell in zip(SUBGROUP_COLUMNS, cells, strict=True):
            value, _, interval = cell.partition(" ")
            assert _close(float(value), metrics[f"{prefix}/{name}"]), (group, name)
            if interval:
                expected_interval = (
                    metrics[f"{prefix}/{name}_ci_low"],
                    metrics[f"{prefix}/{name}_ci_high"],
                )
                assert _interval(interval) == pytest.approx(expected_interval, abs=1e-4)
    boot = report["bootstrap"]
    assert f"{boot['resamples']} resamples of {report['unit']} (seed {boot['seed']})" in card


def _fake_report(min_size: int) -> dict:
    """A `test_report` of random predictions on 40 images in two sites (30 + 10)."""
    rng = np.random.default_rng(0)
    n = 40
    raw = {t: torch.softmax(torch.tensor(rng.normal(size=(n, k))), 1) for t, k in TASKS.items()}
    targets = {t: torch.tensor(rng.integers(0, k, n)) for t, k in TASKS.items()}
    records = [
        Record(Path(f"{i}.png"), 0, 0, "synthetic", str(i), groups=(("site", "ab"[i >= 30]),))
        for i in range(n)
    ]
    settings = IntervalSettings(resamples=50, level=0.95, seed=3, min_size=min_size)
    probs = calibrate(raw, {"dr": 1.5, "dme": 0.8})
    thresholds = {"dr": 0.4, "dme": 0.6}
    metrics, _ = score_split(
        probs, raw, targets, torch.zeros(n, dtype=torch.long), ["synthetic"], records, "test",
        thresholds, settings,
    )  # fmt: skip
    return {
        "images": n, "unit": "images", "subgroups_min_size": min_size,
        "bootstrap": {"resamples": 50, "level": 0.95, "seed": 3},
        "metrics": {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))},
    }  # fmt: skip


def test_card_renders_the_test_report_with_intervals_and_subgroups():
    report = _fake_report(min_size=20)
    summary = {"test_report": report, "splits": {"file": "splits.csv", "sha256": "ab" * 32}}
    points = {"dr": {"threshold": 0.4, "val_sensitivity": 0.9, "val_specificity": 0.5}}
    card = render_model_card(summary, {}, operating_points=points)
    check_card_against_report(card, report)
    groups = _subgroup_rows(card)
    assert groups["site=a"][0] == "30" and "[" in groups["site=a"][1]
    assert groups["site=b"][:2] == ["10", "count only (< 20 images)"]  # under min_size
    assert f"splits.csv sha256: `{'ab' * 32}`" in card
    assert "gradable" in card  # the card says photo quality was not assessed
    # The validation tables stay two-column and parseable.
    assert _table_values(card)["dr/threshold"] == "0.4000"


def test_card_explains_where_the_reduced_precision_test_loop_disagrees():
    """The console's test table (Lightning, bf16) vs the card's fp32 report: both shown, why."""
    report = _fake_report(min_size=20)
    acc = report["metrics"]["test/acc_dr"]
    summary = {"test_report": report, "trainer": {"precision": "bf16-mixed"}}
    summary["test"] = {"test/acc_dr": acc + 0.01, "test/acc_dme": report["metrics"]["test/acc_dme"]}
    card = render_model_card(summary, {})
    (note,) = [line for line in card.splitlines() if "Lightning's test loop ran" in line]
    assert "bf16-mixed" in note and f"test/acc_dr {acc + 0.01:.4f} (here {acc:.4f})" in note
    assert "test/acc_dme" not in note  # equal values are not listed
    assert "reduced precision" in note
    summary["trainer"]["precision"] = "32-true"  # same precision: not blamed on it
    (note,) = [x for x in render_model_card(summary, {}).splitlines() if "test loop ran" in x]
    assert "reduced precision" not in note and "kernels" in note
    summary["test"]["test/acc_dr"] = acc
    assert "Lightning's test loop ran" not in render_model_card(summary, {})


def test_card_interval_header_follows_the_bootstrap_level():
    report = _fake_report(min_size=20)
    report["bootstrap"]["level"] = 0.9
    card = render_model_card({"test_report": report}, {})
    assert "| metric | value | 90% interval |" in card and "95% interval" not in card
    assert "no test split" in render_model_card({"test_report": None}, {})


# Both sides of the cross-check use the same bootstrap and subgroup settings (eval's keys).
REPORT_OVERRIDES = ["bootstrap.resamples=200", "subgroups.min_size=5"]


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory, synthetic_root, cache_dir) -> Path:
    """A tiny run trained with `test=true` (the shared tiny_checkpoint skips test): its dir."""
    tmp = tmp_path_factory.mktemp("tested_run")
    overrides = [
        *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES, f"data.root={synthetic_root}",
        f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp / 'logs'}",
        "trainer.max_epochs=1", "logger=none", "gradcam_images=0", *REPORT_OVERRIDES,
    ]  # fmt: skip
    train(compose_run("train", overrides, tmp / "run"))
    return tmp / "run"


@pytest.mark.slow
def test_training_card_holds_the_test_report_eval_computes(tested_run, cache_dir, tmp_path):
    summary = json.loads((tested_run / "summary.json").read_text())
    report = summary["test_report"]
    card = (tested_run / FILENAME).read_text()
    check_card_against_report(card, report)
    assert f"splits.csv sha256: `{summary['splits']['sha256']}`" in card
    metrics = report["metrics"]
    assert report["images"] == summary["data"]["num_test"] == 16
    assert metrics["test/group/source=synthetic/num"] == 16  # >= min_size 5: with intervals
    assert "test/group/source=synthetic/acc_dr_ci_low" in metrics
    # The same accuracy as Lightning's test loop (torchmetrics) on the same weights.
    for key in ("test/acc_dr", "test/acc_dme", "test/joint_acc"):
        assert metrics[key] == pytest.approx(summary["test"][key], abs=1e-6), key

    # eval.py on the same checkpoint, its own data, split=test: the same numbers, same keys.
    overrides = [
        f"ckpt_path={tested_run / 'checkpoints' / 'best.ckpt'}", "split=test",
        f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path / 'logs'}",
        "num_workers=0", "batch_size=8", "device=cpu", *REPORT_OVERRIDES,
    ]  # fmt: skip
    evaluate(compose_run("eval", overrides, tmp_path / "eval"))
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) <= set(evaluated)  # eval adds the gradable subset and grouping only
    for key, value in metrics.items():
        if value is None:
            assert evaluated[key] is None, key
        else:
            assert evaluated[key] == pytest.approx(value, abs=1e-6), key


def test_bad_bootstrap_setting_fails_before_training(make_cfg):
    with pytest.raises(ConfigurationError, match=r"bootstrap\.level=95\.0 .*\(0, 1\)"):
        train(make_cfg("bootstrap.level=95.0"))
    with pytest.raises(ConfigurationError, match=r"subgroups\.min_size=-1"):
        train(make_cfg("subgroups.min_size=-1"))
