"""EMA weights through Lightning's `EMAWeightAveraging` (`'callbacks=[default,ema]'`)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from tests.test_resume_sweep import _cli
from visioncare.tasks.train import run as train

pytestmark = pytest.mark.slow


def test_ema_weights_differ_from_raw_and_are_the_ones_in_best_ckpt(make_cfg):
    # A low decay makes the average move visibly within the tiny run's few steps.
    cfg = make_cfg(
        "callbacks=[default,ema]",
        "callbacks.ema.decay=0.5",
        "unfreeze_step=0",
        "trainer.max_epochs=1",
        "logger=none",
        "test=false",
    )
    train(cfg)
    ckpt = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    floats = [k for k, v in raw.items() if v.is_floating_point()]
    assert any(not torch.equal(averaged[k], raw[k]) for k in floats)


def test_ema_sigkill_then_resume_matches_an_unbroken_run(tmp_path, synthetic_root, cache_dir):
    """Both the raw and the averaged weights come back from last.ckpt: val metrics (on the average)
    and the final averaged weights equal an unbroken run's."""
    extra = ["callbacks=[default,ema]", "callbacks.ema.decay=0.5", "trainer.max_epochs=3"]
    extra += ["unfreeze_step=1", "seed=7"]
    unbroken = tmp_path / "unbroken"
    _cli(*extra, synthetic_root=synthetic_root, cache_dir=cache_dir, logs=unbroken)

    killed = tmp_path / "killed"
    command = [
        sys.executable, "src/train.py", *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES, "logger=none",
        f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={killed}",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    metrics = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(killed.glob("train/runs/*/metrics.csv"))
        epoch_done = found and len(found[0].read_text().splitlines()) >= 2  # header + epoch 0
        # metrics.csv's row comes before last.ckpt's (atomic) write: wait for both.
        if epoch_done and (found[0].parent / "checkpoints" / "last.ckpt").is_file():
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None and process.poll() is None, "training ended before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run = metrics.parent
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] < 2  # the kill really interrupted training
    _cli(
        f"ckpt_path={last}", *extra, synthetic_root=synthetic_root, cache_dir=cache_dir, logs=killed
    )

    def rows(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    (reference,) = unbroken.glob("train/runs/*/metrics.csv")
    expected, actual = rows(reference), rows(run / "metrics.csv")
    assert [r["epoch"] for r in actual] == [r["epoch"] for r in expected] == list("012")
    for want, got in zip(expected, actual, strict=True):
        for key in ("train/loss", "val/loss", "val/avg_acc"):
            a, b = float(want[key]), float(got[key])
            assert abs(a - b) <= 1e-4 * max(abs(a), 1e-8), (want["epoch"], key, a, b)
    (ref_last,) = unbroken.glob("train/runs/*/checkpoints/last.ckpt")
    want_sd = torch.load(ref_last, weights_only=False)["state_dict"]
    got_sd = torch.load(last, weights_only=False)["state_dict"]
    for key, value in want_sd.items():
        if value.is_floating_point():
            assert torch.allclose(value, got_sd[key], atol=1e-5), key
