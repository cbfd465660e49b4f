"""Sweeps through Hydra's submitit launcher: SLURM options from conf/hydra/launcher/slurm.yaml,
one requeue owner under submitit, and a real `submitit_local` sweep."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment

from tests.conftest import CONF, ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from tests.test_launchers import clean_env, slurm_job  # noqa: F401  (fixture)
from visioncare.config import register_resolvers
from visioncare.runs.trainer import build_trainer
from visioncare.utils import accelerator


class _Submitted(Exception):
    """Raised instead of submitting: carries the executor the launcher configured."""


def test_slurm_launcher_config_becomes_sbatch_options(tmp_path, monkeypatch):
    """Every documented key of hydra/launcher=slurm reaches sbatch (a typo would fail here)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("srun", "sbatch"):  # submitit checks that it runs on a SLURM cluster
        (fake_bin / tool).write_text("#!/bin/sh\nexit 1\n")
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    def capture(executor, *args, **kwargs):
        raise _Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                "hydra.launcher.setup=[module load cuda]", f"paths.log_dir={tmp_path}",
            ],
            return_hydra_config=True,
        )  # fmt: skip
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    executor = submitted.value.args[0]
    sbatch = executor._executor._make_submission_file_text("python job.py", "uid")
    for option in (
        "--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8",
        "--mem=32GB", "--time=240", "--signal=USR2@120",
    ):  # fmt: skip
        assert f"#SBATCH {option}\n" in sbatch, (option, sbatch)
    assert "\nmodule load cuda\n" in sbatch
    assert executor._executor.max_num_timeout == 3
    assert executor._executor.parameters["array_parallelism"] == 8


def test_under_submitit_only_submitit_requeues(slurm_job, monkeypatch, make_cfg):  # noqa: F811
    monkeypatch.setenv("SLURM_NTASKS", "1")
    cfg = make_cfg("logger=none")
    accelerator.resolve_trainer_flags(cfg)
    plain = build_trainer(cfg.trainer, [], [])._accelerator_connector.cluster_environment
    assert isinstance(plain, SLURMEnvironment) and plain.auto_requeue  # `srun` by hand: Lightning
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    env = build_trainer(cfg.trainer, [], [])._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_directory(tmp_path, synthetic_root, cache_dir):
    logs = tmp_path / "logs"
    command = [
        sys.executable, "src/train.py", "-m", "hydra/launcher=submitit_local",
        *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES, "trainer.max_epochs=1", "logger=none",
        "gradcam_images=0", f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={logs}", "seed=0,1",
    ]  # fmt: skip
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file()
        assert (sweep / job / "checkpoints" / "best.ckpt").is_file()
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    with open(sweep / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    seeds = {o for r in rows for o in r["overrides"].split() if o.startswith("seed=")}
    assert seeds == {"seed=0", "seed=1"}
    assert Path(sweep / "sweep_summary.md").is_file()
