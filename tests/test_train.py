"""End-to-end training through the real Hydra config: the run-directory contract and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from tests.conftest import ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from visioncare.errors import ConfigurationError
from visioncare.tasks.train import run as train
from visioncare.utils import accelerator

CONTRACT_COLUMNS = [
    "epoch", "train/loss", "train/loss_dr", "train/loss_dme", "val/loss", "val/loss_dr",
    "val/loss_dme", "train/acc_dr", "train/acc_dme", "val/acc_dr", "val/acc_dme", "val/f1_dr",
    "val/f1_dme", "val/avg_acc", "lr", "time/epoch_s", "memory/rss_mb", "loss/sigma_dr",
    "loss/sigma_dme", "unfreeze/stage", "unfreeze/trainable_fraction",
]  # fmt: skip


HP_METRICS = {
    "hp/best_val_avg_acc",
    "hp/best_val_joint_acc",
    "hp/test_avg_acc",
    "hp/test_joint_acc",
}


def assert_tensorboard_complete(run: Path, gradcam_images: int) -> None:
    """What the run wrote after training is on disk, read back by TensorBoard's own loader.

    The Grad-CAM previews and the final hparams/hp-metrics are written after Lightning has
    finalized the logger; unflushed, the tail of the event file was lost at exit.
    """
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    gradcam = [t for t in tags["images"] if t.startswith("gradcam/")]
    assert len(gradcam) == 2 * gradcam_images, gradcam  # one overlay per task
    # The validation reliability diagrams (calibrated beside raw), one per task.
    reliability = {t for t in tags["images"] if t.startswith("calibration/")}
    assert reliability == {"calibration/reliability_dr", "calibration/reliability_dme"}
    assert (run / "plots" / "reliability_dr.png").is_file()
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    declared = set()
    for content in hparams.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        declared |= {info.name.tag for info in data.experiment.metric_infos}
    assert declared == HP_METRICS
    assert set(tags["scalars"]) >= HP_METRICS  # each declared metric has its value


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cli_run_leaves_the_run_directory_contract(tmp_path, synthetic_root, cache_dir):
    logs = tmp_path / "logs"
    command = [
        sys.executable, "src/train.py", *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES,
        "trainer.max_epochs=4", "unfreeze_step=1",
        f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (logs / "train" / "runs").iterdir()
    for name in [
        ".hydra/config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.csv",
        "summary.json", "plots/loss.png", "plots/accuracy.png", "plots/f1.png",
        "plots/confusion_val_dr.png", "plots/confusion_test_dme.png",
    ]:  # fmt: skip
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Grad-CAM previews of 4 validation images, one per task, also sent to TensorBoard.
    assert len(list((run / "plots" / "gradcam").glob("*.png"))) == 8
    assert_tensorboard_complete(run, gradcam_images=4)

    rows = _rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # one row per epoch
    assert set(CONTRACT_COLUMNS) <= set(rows[0])
    for row in rows:
        assert all(row[c] != "" for c in CONTRACT_COLUMNS), row
    assert [int(float(r["unfreeze/stage"])) for r in rows] == [0, 1, 2, 3]
    fractions = [float(r["unfreeze/trainable_fraction"]) for r in rows]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # cosine decays

    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == {"num_train": 32, "num_val": 8, "num_test": 16}
    assert 0 <= summary["best"]["epoch"] <= 3
    best_row = rows[summary["best"]["epoch"]]
    assert float(best_row["val/avg_acc"]) == pytest.approx(summary["best"]["val/avg_acc"])
    assert max(float(r["val/avg_acc"]) for r in rows) == pytest.approx(
        summary["best"]["val/avg_acc"]
    )
    for key in ("test/acc_dr", "test/f1_dme", "test/qwk_dr", "test/joint_acc", "test/avg_acc"):
        assert key in summary["test"]
    assert "avg_acc" in done.stdout  # the closing table
    # trainer.precision=auto resolved once: the values that ran, wherever the run records them.
    ran = {"precision": str(accelerator.resolve_precision("auto", "cpu")), "benchmark": False}
    assert summary["trainer"] == ran
    stored = OmegaConf.load(run / ".hydra" / "config.yaml").trainer
    assert stored.precision == "auto"  # Hydra's record of what was asked for
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["trainer.precision"].string_value == ran["precision"]

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert checkpoint["visioncare_config"]["model"]["backbone"] == "test_efficientnet"
    trainer_config = checkpoint["visioncare_config"]["trainer"]
    assert {k: trainer_config[k] for k in ran} == ran
    assert "BestAverageAccuracy" in " ".join(checkpoint["callbacks"])


@pytest.mark.slow
def test_train_returns_metrics_and_honours_unfreeze_off(make_cfg):
    cfg = make_cfg("unfreeze_step=0", "trainer.max_epochs=1", "logger=none")
    metrics = train(cfg)
    assert 0.0 <= metrics["val/avg_acc"] <= 1.0 and "test/joint_acc" in metrics
    rows = _rows(Path(cfg.paths.output_dir) / "metrics.csv")
    assert float(rows[0]["unfreeze/stage"]) == 3.0
    assert float(rows[0]["unfreeze/trainable_fraction"]) == 1.0


@pytest.mark.slow
def test_each_metrics_row_has_its_own_epochs_training_values(make_cfg):
    """An epoch cut short by max_steps still gets its own train/* values, not the last epoch's."""
    cfg = make_cfg("trainer.max_epochs=3", "+trainer.max_steps=5", "logger=none", "test=false")
    train(cfg)
    rows = _rows(Path(cfg.paths.output_dir) / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    steps_per_epoch = 4  # 32 training images (40 less the validation fifth) in batches of 8
    assert float(rows[0]["train/num_dr"]) == steps_per_epoch * 8
    assert float(rows[1]["train/num_dr"]) == 8  # the single step of the cut-short epoch
    assert rows[1]["train/loss"] != rows[0]["train/loss"]


def test_missing_checkpoint_is_an_error_not_a_fresh_start(make_cfg, tmp_path):
    cfg = make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ConfigurationError, match="does not exist"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_cli_bad_data_root_fails_cleanly(tmp_path):
    command = [
        sys.executable, "src/train.py", "data=idrid", f"data.root={tmp_path / 'missing'}",
        "model=tiny", f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "data.root=" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not list((tmp_path / "logs").glob("**/*.ckpt"))


@pytest.mark.slow
def test_everything_written_to_tensorboard_is_on_disk_when_train_returns(make_cfg, monkeypatch):
    """The tail a run writes after Lightning closed the logger must not wait in a queue.

    TensorBoard's writer thread drains its queue in the background and, being a daemon, dies
    with the process; a slow disk (simulated: 20 ms per record) leaves the queue's tail unwritten
    when `train` returns, exactly what a real run lost at exit.
    """
    slow_write = RecordWriter.write

    def write(self, data):
        time.sleep(0.02)
        slow_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    cfg = make_cfg("trainer.max_epochs=1", "gradcam_images=3")
    train(cfg)
    assert_tensorboard_complete(Path(cfg.paths.output_dir), gradcam_images=3)
