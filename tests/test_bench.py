"""`make bench` must keep running: every benchmark at its smallest settings (`run_all --smoke`).

The figures of a smoke run mean nothing (timm's test model, 32-px images, one or two steps); what
is checked is that each script still drives the real code paths end to end and reports every
budgeted row. The budgets themselves are checked by running `make bench`, not by tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BUDGETED_ROWS = (
    "Data loading: Warm epoch data time",
    "Data loading: Loader ÷ model throughput",
    "Training speed: Project ÷ plain loop",
    "Training speed: Stage 0 ÷ stage 3",
    "Training speed: Default CPU recipe",
    "Inference: Model only: onnxruntime ÷ PyTorch eager",
    "Inference: predict.py pipeline: onnxruntime ÷ PyTorch eager",
    "Grad-CAM: Batched ÷ per-image loop",
)


@pytest.mark.slow
def test_every_benchmark_runs_and_reports_its_budgets():
    command = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    summary = done.stdout.split("= summary =")[-1]
    for row in BUDGETED_ROWS:
        assert row in summary, f"{row!r} missing from the summary:\n{summary}"
    reports = ("Training process peak RSS", "Whole run peak PSS", "Stage 3 (all)", "locate + crop")
    for report in reports:
        assert report in done.stdout, report
