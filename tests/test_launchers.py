"""One run, one directory under every launcher: torchrun (2 CPU processes), SLURM (by its env)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF, ROOT, TINY_OVERRIDES
from visioncare.config import register_resolvers
from visioncare.runs import launcher, resume

# A launcher's variables in the environment of the process running the tests must not leak in.
LAUNCHER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}


@pytest.mark.slow
def test_torchrun_two_cpu_processes_share_one_run(tmp_path):
    """torchrun, 2 gloo ranks, an empty data folder, 1 validation and 1 test image.

    Every rank must resolve the same run directory (rank 1 evaluates the `best.ckpt` rank 0
    wrote), prepare the data once, and a rank whose evaluation shard has no image of its own
    must not hang the other one.
    """
    logs, data = tmp_path / "logs", tmp_path / "empty"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "src/train.py", *TINY_OVERRIDES, "trainer=ddp_cpu", "trainer.max_epochs=2",
        "data.num_train=16", "data.num_test=1", "data.val_fraction=0.07", "data.render_size=128",
        f"data.root={data / 'synthetic'}", f"paths.cache_dir={data / 'cache'}",
        f"paths.log_dir={logs}", "logger=csv", "gradcam_images=1",
    ]  # fmt: skip
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # not one directory per rank
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / ".hydra" / "config.yaml").is_file()
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(r["epoch"])) for r in rows] == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["num_val"] == 1 and summary["data"]["num_test"] == 1
    # The one image is counted once although both ranks ran a validation step.
    assert summary["best"]["val/num_dr"] == 1
    assert summary["test"]["test/num_dr"] == 1
    # Rendered once: no second build, no temp folder left behind.
    output = done.stdout + done.stderr
    assert output.count("Rendering 17 synthetic fundus images") == 1, output[-3000:]
    assert not list(data.glob(".synthetic.*"))


def compose_run_dir(overrides: list[str], config_name: str = "train") -> str:
    """`hydra.run.dir` as the entry point would resolve it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return str(cfg.hydra.run.dir)


@pytest.fixture
def slurm_job(monkeypatch):
    """The variables `srun` sets for task 0 of job 4242 (what Lightning's detection reads)."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_VARIABLES):
            monkeypatch.delenv(key)
    for key, value in {
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    launcher.run_name.cache_clear()
    yield
    launcher.run_name.cache_clear()


def test_slurm_tasks_share_a_run_directory_named_after_the_job(slurm_job, monkeypatch, tmp_path):
    first = compose_run_dir([f"paths.log_dir={tmp_path}"])
    assert first == f"{tmp_path}/train/runs/slurm-4242"
    launcher.run_name.cache_clear()
    monkeypatch.setenv("SLURM_PROCID", "1")  # another task, same job: same directory
    assert compose_run_dir([f"paths.log_dir={tmp_path}"]) == first
    # An interactive allocation (`srun --job-name=interactive`) is no SLURM-managed run.
    launcher.run_name.cache_clear()
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert "slurm-" not in compose_run_dir([f"paths.log_dir={tmp_path}"])


@pytest.mark.parametrize("task", ["eval", "predict", "export", "preprocess", "ablate"])
def test_single_process_tasks_take_their_own_directory_inside_a_slurm_job(
    slurm_job, tmp_path, task
):
    """Two evaluations in one SLURM job must not write into one directory (no requeue, no ranks)."""
    first = compose_run_dir([f"paths.log_dir={tmp_path}"], task)
    launcher.run_name.cache_clear()
    second = compose_run_dir([f"paths.log_dir={tmp_path}"], task)
    assert first.startswith(f"{tmp_path}/{task}/runs/") and "slurm-" not in first
    assert first != second


def test_only_rank_zero_writes_the_hydra_config(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert launcher.rank_zero_subdir(".hydra") is None
    monkeypatch.setenv("RANK", "0")
    assert launcher.rank_zero_subdir(".hydra") == ".hydra"


def test_requeued_slurm_job_resumes_from_its_newest_checkpoint(slurm_job, tmp_path):
    run = tmp_path / "slurm-4242"
    assert resume.requeue_checkpoint(run) is None  # first start: a fresh run
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resume.requeue_checkpoint(run) == last  # requeued after a node failure
    hpc = run / "hpc_ckpt_1.ckpt"  # Lightning's checkpoint on the requeue signal, written later
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert resume.requeue_checkpoint(run) == hpc


def test_requeue_beats_the_given_ckpt_path_only_after_a_restart(slurm_job, monkeypatch, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    newest = tmp_path / "checkpoints" / "last.ckpt"
    newest.write_bytes(b"x")
    given = "/runs/earlier/checkpoints/best.ckpt"
    assert resume.requeued_or_given(tmp_path, given) == given  # first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the same command again
    assert resume.requeued_or_given(tmp_path, given) == str(newest)
    assert resume.requeued_or_given(tmp_path / "fresh", None) is None


def test_outside_slurm_a_run_never_resumes_by_itself(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume.requeue_checkpoint(tmp_path) is None


def test_torchrun_ranks_take_the_first_proposal_from_the_agent_store(monkeypatch):
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    assert launcher.torchelastic_run_name("rank0-time") == "rank0-time"
    assert launcher.torchelastic_run_name("rank1-time") == "rank0-time"


@pytest.mark.slow
def test_slurm_requeue_is_resumed_by_train(slurm_job, make_cfg, monkeypatch):
    """A requeued job's train() picks up the last.ckpt in its own run directory by itself."""
    monkeypatch.setenv("SLURM_NTASKS", "1")
    from omegaconf import open_dict

    from visioncare.tasks.train import run as train

    cfg = make_cfg("trainer.max_epochs=1", "logger=none", "test=false", "gradcam_images=0")
    metrics_csv = Path(cfg.paths.output_dir, "metrics.csv")

    def rows() -> list[dict[str, str]]:
        with open(metrics_csv, newline="") as handle:
            return list(csv.DictReader(handle))

    train(cfg)
    first_epoch = rows()
    assert len(first_epoch) == 1
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
    train(cfg)  # the same job id, the same run directory: continues with epoch 1
    after = rows()
    assert [int(float(row["epoch"])) for row in after] == [0, 1]
    assert after[0] == first_epoch[0]  # epoch 0 was not trained again (its timing would differ)


def test_gpu_check_script_is_valid_bash():
    """bench/gpu_check.sh runs only where a GPU is; here at least it must parse."""
    script = ROOT / "bench" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
