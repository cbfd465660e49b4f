"""One number formatter: report.md, ablation.md, the sweep summary and the console tables."""

from __future__ import annotations

import math
from pathlib import Path

from visioncare.scoring.report import _fmt_ci
from visioncare.tasks.ablate import Job, write_markdown
from visioncare.utils.formatting import fmt_interval, fmt_number


def test_numbers_missing_values_and_signs():
    assert fmt_number(0.123456) == "0.1235"
    assert fmt_number(0.5, 3) == "0.500" and fmt_number(7, 1) == "7.0"
    assert fmt_number(0.02, 3, signed=True) == "+0.020"
    assert fmt_number(-0.02, 3, signed=True) == "-0.020"
    assert fmt_number(None) == fmt_number(math.nan) == "—"
    assert fmt_number(None, missing="n/a") == "n/a"


def test_intervals():
    assert fmt_interval(0.1, 0.25) == "[0.1000, 0.2500]"
    assert fmt_interval(-0.1, 0.2, 3, signed=True) == "[-0.100, +0.200]"
    assert fmt_interval(None, 0.2) == fmt_interval(math.nan, math.nan) == "—"
    assert fmt_interval(None, None, missing="") == ""


def test_report_cell_is_the_value_and_its_interval():
    metrics = {"test/acc_dr": 0.5, "test/acc_dr_ci_low": 0.25, "test/acc_dr_ci_high": 0.75}
    assert _fmt_ci(metrics, "test/acc_dr") == "0.5000 [0.2500, 0.7500]"
    assert _fmt_ci({"test/acc_dr": 0.5}, "test/acc_dr") == "0.5000"
    assert _fmt_ci({}, "test/acc_dr") == "—"


def test_ablation_table_rows(tmp_path: Path):
    jobs = [
        Job(arm, seed, [], tmp_path, status="ok", metrics={"test_avg_acc": value})
        for arm, seed, value in [("a", 0, 0.6), ("a", 1, 0.7), ("b", 0, 0.5), ("b", 1, 0.7)]
    ]
    write_markdown(tmp_path / "ablation.md", jobs, ["a", "b"], "a", {})
    table = (tmp_path / "ablation.md").read_text().split("## test avg_acc")[1]
    assert "| a | 2 | 0.650 ± 0.071 | [0.015, 1.285] | — | — |" in table
    assert "| b | 2 | 0.600 ± 0.141 | [-0.671, 1.871] | -0.050 | [-0.685, +0.585] |" in table
