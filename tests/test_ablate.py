"""`src/ablate.py`: arms × seeds through the real entry points, a crashed arm, the statistics."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONF, ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from visioncare.composition import compose_config
from visioncare.errors import ConfigurationError
from visioncare.tasks import ablate
from visioncare.tasks.ablate import Job, mean_interval, paired_differences


def test_mean_interval_is_the_t_interval_by_hand():
    values = [0.61, 0.66, 0.58, 0.70]
    mean, std, low, high = mean_interval(values, 0.95)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    t_975_df3 = 3.182446305284263  # Student t, 97.5th percentile, 3 degrees of freedom
    half = t_975_df3 * np.std(values, ddof=1) / 2
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert math.isnan(mean_interval([0.5])[2]) and math.isnan(mean_interval([])[0])


def test_paired_differences_use_seeds_both_arms_finished():
    def job(arm: str, seed: int, value: float, status: str = "ok") -> Job:
        return Job(arm, seed, [], Path("."), status=status, metrics={"test_avg_acc": value})

    jobs = [
        job("recipe", 0, 0.60), job("recipe", 1, 0.70), job("recipe", 2, 0.65),
        job("fp32", 0, 0.62), job("fp32", 1, 0.0, status="failed (exit 1)"), job("fp32", 2, 0.61),
    ]  # fmt: skip
    assert paired_differences(jobs, "fp32", "recipe", "test_avg_acc") == pytest.approx(
        [0.02, -0.04]
    )


def _ablate_cfg(tmp_path: Path, *overrides: str):
    overrides = (f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path}", *overrides)
    cfg = compose_config(CONF, "ablate", overrides)
    cfg.paths.output_dir = str(tmp_path / "ablation")
    return cfg


def test_default_arms_compose_with_train(tmp_path):
    cfg = _ablate_cfg(tmp_path)
    jobs = ablate.plan_jobs(cfg, tmp_path)
    assert {job.arm for job in jobs} == set(cfg.arms)
    ablate.check_arms(cfg, jobs)  # raises if one does not


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ['+arms.typo=["model.dr_haed=ordinal"]', "only=[recipe,typo]"],
            ["arm 'typo'", "model.dr_haed is not a config key", "arms.typo"],
        ),
        (
            ['+arms.typo=["loss=nope"]', "only=[recipe,typo]"],
            ["arm 'typo'", "Could not find 'loss/nope'", "fixed", "arms.typo"],
        ),
        (
            ['extra=["trainer.max_epoch=1"]'],
            ["shared overrides", "trainer.max_epoch", "common or extra"],
        ),
        (["only=[recipe,nope]"], ["only=", "'nope'"]),
        (["only=[fp32]"], ["baseline='recipe'", "only"]),
    ],
)  # fmt: skip
def test_bad_arms_stop_the_ablation_before_any_job(tmp_path, monkeypatch, overrides, fragments):
    started = []
    monkeypatch.setattr(ablate, "run_job", lambda job, timeout_s=None: started.append(job))
    with pytest.raises(ConfigurationError) as raised:
        ablate.run(_ablate_cfg(tmp_path, *overrides, "seeds=[0,1]"))
    message = str(raised.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not started


@pytest.mark.slow
def test_ablate_cli_runs_arms_reports_a_crash_and_writes_the_table(
    tmp_path, synthetic_root, cache_dir
):
    """Two real arms and one that cannot start, one seed, through `python src/ablate.py`."""
    shrink = [*TINY_OVERRIDES, *SYNTHETIC_OVERRIDES, "trainer.max_epochs=1", "logger=none"]
    # The session's shared standard set (the default `common` asks for the hard one).
    shrink += [f"data.root={synthetic_root}", "data.difficulty=standard", "gradcam_images=0"]
    # A new arm next to the defaults, then `only` picks the three to run.
    broken = '+arms.broken=["model.backbone=no_such_backbone"]'
    only = "only=[recipe,fixed_weights,broken]"
    command = [
        sys.executable, str(ROOT / "src" / "ablate.py"), f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={cache_dir}", "extra=[" + ",".join(f'"{o}"' for o in shrink) + "]",
        broken, only, "seeds=[0]", f"hydra.run.dir={tmp_path / 'ablation'}",
    ]  # fmt: skip
    env = {**os.environ, "VISIONCARE_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "ablation"
    with (out / "ablation.csv").open(newline="") as handle:
        rows = {r["arm"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"recipe", "fixed_weights", "broken"}
    assert rows["recipe"]["status"] == rows["fixed_weights"]["status"] == "ok"
    assert (
        rows["broken"]["status"].startswith("failed")
        and "no_such_backbone" in (rows["broken"]["error"])
    )
    for arm in ("recipe", "fixed_weights"):
        run = Path(rows[arm]["run_dir"])
        assert (run / "summary.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
        assert 0.0 <= float(rows[arm]["test_avg_acc"]) <= 1.0
        assert float(rows[arm]["train_s"]) > 0
    # The fixed-weights arm really ran with the other loss (its config says so).
    config = (Path(rows["fixed_weights"]["run_dir"]) / ".hydra" / "config.yaml").read_text()
    assert "FixedWeightLoss" in config
    report = (out / "ablation.md").read_text()
    assert "| recipe | 1 |" in report and "## test QWK DR" in report
    assert "broken" in report.split("## Jobs that did not finish")[1]
    assert (out / "plots" / "val_curves.png").is_file()
