"""Resuming in the run's own directory, checkpoint checks, and the multirun sweep summary."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.conftest import CONF, ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from tests.test_train import assert_tensorboard_complete
from visioncare.errors import ConfigurationError
from visioncare.runs.resume import (
    ResumeRunDir,
    carry_best_checkpoint,
    hydra_output_subdir,
    resolve_ckpt_path,
    resume_run_dir,
)
from visioncare.tasks.train import run as train


def _cli(
    *args: str, synthetic_root: Path, cache_dir: Path, logs: Path, multirun: bool = False
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "src/train.py", *(["-m"] if multirun else []),
        *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES,
        f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}",
        "logger=none", *args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_resume_continues_in_the_same_run_directory(tmp_path, synthetic_root, cache_dir):
    logs = tmp_path / "logs"
    _cli("trainer.max_epochs=2", synthetic_root=synthetic_root, cache_dir=cache_dir, logs=logs)
    (run,) = (logs / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    first = {
        name: (run / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml")
    }
    _cli(
        f"ckpt_path={last}", "trainer.max_epochs=3",
        synthetic_root=synthetic_root, cache_dir=cache_dir, logs=logs,
    )  # fmt: skip
    assert [p.name for p in (logs / "train" / "runs").iterdir()] == [run.name]
    # The first run's composed config stays; the resume's own is kept beside it.
    for name, text in first.items():
        assert (run / ".hydra" / name).read_text() == text, name
    (resumed,) = (run / ".hydra").glob("resume-*/overrides.yaml")
    assert f"ckpt_path={last}" in resumed.read_text()
    assert "max_epochs: 3" in (resumed.parent / "config.yaml").read_text()
    with open(run / "metrics.csv", newline="") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2]
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert (run / "checkpoints" / "best.ckpt").is_file()
    # `last` finds the newest last.ckpt of the task, and resumes in its directory too.
    assert resolve_ckpt_path("last", logs / "train") == str(last)
    assert resume_run_dir("last", str(logs / "train"), "fresh") == str(run.resolve())


@pytest.mark.slow
def test_resume_into_another_directory_brings_the_best_checkpoint(make_cfg, tmp_path):
    """`ckpt_path=<run A>/checkpoints/last.ckpt` with another run dir (explicit hydra.run.dir).

    A resume that trains no better epoch writes no best.ckpt of its own; the test phase needs
    the original one. Resuming a finished run (no epoch left) is the deterministic case.
    """
    first = make_cfg("trainer.max_epochs=2", "logger=none", "test=false")
    with open_dict(first):
        first.paths.output_dir = str(tmp_path / "A")
    train(first)
    last = tmp_path / "A" / "checkpoints" / "last.ckpt"
    again = make_cfg(f"ckpt_path={last}", "trainer.max_epochs=2", "logger=none")
    with open_dict(again):
        again.paths.output_dir = str(tmp_path / "B")
    metrics = train(again)
    assert "test/acc_dr" in metrics
    copied = tmp_path / "B" / "checkpoints" / "best.ckpt"
    assert copied.read_bytes() == (tmp_path / "A" / "checkpoints" / "best.ckpt").read_bytes()

    # Only last.ckpt was copied somewhere: refused before training, naming the missing file.
    lonely = tmp_path / "elsewhere" / "last.ckpt"
    lonely.parent.mkdir()
    shutil.copy2(last, lonely)
    alone = make_cfg(f"ckpt_path={lonely}", "trainer.max_epochs=3", "logger=none")
    with open_dict(alone):
        alone.paths.output_dir = str(tmp_path / "C")
    with pytest.raises(ConfigurationError, match=r"best checkpoint \(epoch \d\).*best\.ckpt"):
        train(alone)
    assert not (tmp_path / "C" / "checkpoints" / "last.ckpt").exists()

    # A requeued SLURM job resumes from Lightning's hpc_ckpt_<n>.ckpt in the run directory itself;
    # its best.ckpt is in checkpoints/ below it, right where the resumed run wants it.
    hpc = tmp_path / "A" / "hpc_ckpt_1.ckpt"
    shutil.copy2(last, hpc)
    carry_best_checkpoint(hpc, tmp_path / "A" / "checkpoints" / "best.ckpt")


def test_home_relative_checkpoint_resumes_in_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    found = resume_run_dir("~/runs/r1/checkpoints/last.ckpt", str(tmp_path), "fresh")
    assert found == str(run.resolve())


def test_bad_checkpoints_are_named(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ConfigurationError, match=r"junk\.ckpt.*not a readable checkpoint"):
        resolve_ckpt_path(str(junk), tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(ConfigurationError, match=r"foreign\.ckpt.*not a VisionCare checkpoint"):
        resolve_ckpt_path(str(foreign), tmp_path)
    with pytest.raises(ConfigurationError, match=r"ckpt_path=last: no checkpoints/last\.ckpt"):
        resolve_ckpt_path("last", tmp_path)
    assert resume_run_dir(None, str(tmp_path), "fresh") == "fresh"
    assert resume_run_dir(str(junk), str(tmp_path), "fresh") == "fresh"


def _run_dir_after_callback(*overrides: str) -> str:
    """`hydra.run.dir` once train.yaml's ResumeRunDir callback has run, as in `src/train.py`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert "resume_run_dir" in cfg.hydra.callbacks  # registered for training only
    ResumeRunDir().on_run_start(config=cfg)
    return str(cfg.hydra.run.dir)


def test_resume_run_directory_is_decided_in_code(tmp_path):
    """No filesystem search while composing: the callback moves a resume into its run's dir."""
    logs = tmp_path / "logs"
    run = logs / "train" / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    fresh = _run_dir_after_callback(f"paths.log_dir={logs}")
    assert fresh.startswith(f"{logs}/train/runs/") and fresh != str(run)
    assert _run_dir_after_callback(f"paths.log_dir={logs}", f"ckpt_path={last}") == str(run)
    assert _run_dir_after_callback(f"paths.log_dir={logs}", "ckpt_path=last") == str(run)
    # An explicit run directory (yours, or the one Lightning passes to the ranks it starts) wins.
    chosen = tmp_path / "elsewhere"
    explicit = _run_dir_after_callback(f"ckpt_path={last}", f"hydra.run.dir={chosen}")
    assert explicit == str(chosen)
    # Nothing to resume from: a fresh directory; the task then refuses the ckpt_path.
    missing = _run_dir_after_callback(f"paths.log_dir={tmp_path / 'none'}", "ckpt_path=last")
    assert missing.startswith(f"{tmp_path / 'none'}/train/runs/")
    # Other tasks name fresh directories the same way and never look for a resume.
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for task in ("eval", "predict", "export", "preprocess", "ablate"):
            cfg = compose(config_name=task, return_hydra_config=True)
            assert "resume_run_dir" not in cfg.hydra.callbacks, task
            assert str(cfg.hydra.run.dir).startswith(f"{cfg.paths.log_dir}/{task}/runs/"), task
    GlobalHydra.instance().clear()


def test_a_resumed_run_keeps_its_first_config(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert hydra_output_subdir(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    assert hydra_output_subdir(str(tmp_path)).startswith(".hydra/resume-")
    monkeypatch.setenv("RANK", "1")  # other ranks write no config
    assert hydra_output_subdir(str(tmp_path)) is None


@pytest.mark.slow
def test_multirun_sweep_writes_a_ranked_summary(tmp_path, synthetic_root, cache_dir):
    logs = tmp_path / "logs"
    _cli(
        "unfreeze_step=1,2", "trainer.max_epochs=2", "logger=tensorboard", "gradcam_images=2",
        synthetic_root=synthetic_root, cache_dir=cache_dir, logs=logs, multirun=True,
    )  # fmt: skip
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    assert (sweep / "0" / "summary.json").is_file() and (sweep / "1" / "summary.json").is_file()
    for job in ("0", "1"):  # every job's TensorBoard tail is on disk, not only the last one's
        assert_tensorboard_complete(sweep / job, gradcam_images=2)
    with open(sweep / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2"]
    swept = {o for r in rows for o in r["overrides"].split() if o.startswith("unfreeze_step=")}
    assert swept == {"unfreeze_step=1", "unfreeze_step=2"}
    scores = [float(r["best/val/avg_acc"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "| rank |" in (sweep / "sweep_summary.md").read_text()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path, synthetic_root, cache_dir):
    """Kill a real training process after its second epoch, resume, compare with no kill."""
    extra = ["trainer.max_epochs=5", "unfreeze_step=1", "seed=7"]
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
        if found and len(found[0].read_text().splitlines()) >= 3:  # header + epochs 0 and 1
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None and process.poll() is None, "training ended before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run = metrics.parent
    last = run / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(last, weights_only=True)["epoch"]
    assert resumed_from < 4  # the kill really interrupted training
    _cli(
        f"ckpt_path={last}", *extra, synthetic_root=synthetic_root, cache_dir=cache_dir, logs=killed
    )

    def rows(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    (reference,) = unbroken.glob("train/runs/*/metrics.csv")
    expected, actual = rows(reference), rows(run / "metrics.csv")
    assert [r["epoch"] for r in actual] == [r["epoch"] for r in expected] == list("01234")
    for want, got in zip(expected, actual, strict=True):
        for key in (
            "train/loss",
            "val/loss",
            "val/avg_acc",
            "lr",
            "loss/sigma_dr",
            "unfreeze/stage",
        ):
            a, b = float(want[key]), float(got[key])
            assert abs(a - b) <= 1e-4 * max(abs(a), 1e-8), (want["epoch"], key, a, b)
