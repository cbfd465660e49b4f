"""Two-process DDP on CPU (gloo) under Hydra: one run directory, whole validation set covered."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path, synthetic_root, cache_dir):
    logs = tmp_path / "logs"
    command = [
        sys.executable, "src/train.py", *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES,
        "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=none",
        f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # no second run directory for rank 1
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    summary = json.loads((run / "summary.json").read_text())
    # Each rank saw half of the validation images; the metrics cover all of them exactly once.
    assert summary["best"]["val/num_dr"] == summary["data"]["num_val"]
    assert summary["test"]["test/num_dme"] == summary["data"]["num_test"]


@pytest.mark.slow
def test_multirun_with_ddp_is_refused_with_a_clear_message(tmp_path):
    command = [
        sys.executable, "src/train.py", "-m", "trainer=ddp_cpu", "unfreeze_step=1,2",
        "model=tiny", f"paths.log_dir={tmp_path / 'logs'}", f"data.root={tmp_path / 'syn'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "cannot run inside a Hydra multirun" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "syn").exists()  # refused before any data work
