"""One run, one directory, whatever started the processes.

Hydra resolves `hydra.run.dir` in every process before the job starts, so a timestamp taken by each
process would give every rank a directory of its own (and rank 1 would look for `best.ckpt` in an
empty one). The run's name is therefore keyed on what the launcher shares:

- SLURM (`srun`, detected as Lightning detects it): ``slurm-<job id>`` (plus ``.<step>`` inside an
  allocation's numbered job steps). The name survives a requeue, so a requeued job finds its own
  checkpoints again (`visioncare.runs.resume.requeue_checkpoint`).
- torchrun: every rank proposes its timestamp to the elastic agent's TCP store with one atomic
  ``compare_set``; the first proposal wins and every rank, on every node, uses it.
- Lightning's own DDP launcher passes ``hydra.run.dir`` to the processes it starts: nothing to do.
- A single process: its own timestamp, with microseconds so two runs never share a directory.

A Hydra multirun (`-m`, any launcher, submitit's included) puts each job in
``<sweep dir>/<job number>``; the run name is not used there. A submitit job that SLURM requeues
runs the same job number again, so it finds its own checkpoints the same way.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from functools import cache

from lightning.fabric.plugins.environments import SLURMEnvironment

from visioncare.errors import ConfigurationError

TIMESTAMP_FORMAT = "%Y-%m-%d_%H-%M-%S-%f"
# How long a torchrun rank waits for the elastic agent's store (it is up before workers start).
STORE_TIMEOUT = timedelta(seconds=60)


def timestamp() -> str:
    """This process's clock as a run name."""
    return datetime.now().strftime(TIMESTAMP_FORMAT)


def slurm_run_name() -> str | None:
    """``slurm-<job id>[.<step>]`` under a SLURM job that Lightning treats as one, else None.

    Array tasks use ``<array job id>_<task id>``, the id `scontrol requeue` takes.
    """
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
    step = os.environ.get("SLURM_STEP_ID", "")
    return f"slurm-{job}.{step}" if step.isdigit() else f"slurm-{job}"


def torchelastic_run_name(proposal: str) -> str | None:
    """The run name all torchrun ranks agree on (first proposal wins), or None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        import torch.distributed as dist

        store = dist.TCPStore(
            host_name=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=STORE_TIMEOUT,
        )
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"visioncare/run_name/{run_id}/{restart}"
        return store.compare_set(key, "", proposal).decode()
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    raise ConfigurationError(
        "torchrun without its agent's store and without --rdzv-id: the ranks cannot agree on one "
        "run directory. Pass --rdzv-id=<unique id> (or --standalone) to torchrun, or give every "
        "rank the same hydra.run.dir=<dir>"
    )


@cache
def run_name(task: str = "train") -> str:
    """Hydra resolver ``${run_name:${task_name}}``: the name of this run's directory (module doc).

    Only training runs on several processes or is requeued, so only training takes the
    launcher's shared name; eval, predict, export, preprocess and ablate always take their own
    timestamp, so two of them in one SLURM job never write into one directory.
    Cached: Hydra may resolve the run directory more than once per process.
    """
    if task != "train":
        return timestamp()
    return slurm_run_name() or torchelastic_run_name(timestamp()) or timestamp()


def submitit_slurm_environment() -> SLURMEnvironment | None:
    """Inside a job submitted by submitit (`hydra/launcher=slurm`): Lightning's SLURM environment
    with its auto-requeue off, else None (Lightning's default detection).

    submitit owns preemption and time limits: SLURM sends SIGUSR2, submitit's handler requeues the
    job (`scontrol requeue`) and exits; the requeued job resumes from its directory's last.ckpt.
    Lightning's auto-requeue listens on SIGUSR1 and would write `hpc_ckpt_<n>.ckpt` and requeue
    the same job a second time if that signal came too; one tool requeues.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not SLURMEnvironment.detect():
        return None
    return SLURMEnvironment(auto_requeue=False)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 before any process group exists)."""
    for variable in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_zero_subdir(subdir: str) -> str | None:
    """``subdir`` on rank 0, else None: only rank 0 writes the composed config (Hydra's
    ``output_subdir``, see `visioncare.runs.resume.hydra_output_subdir`).

    Every rank shares the run directory; N processes rewriting `.hydra/config.yaml` at once could
    leave it torn. (Lightning's launcher passes ``hydra.output_subdir=null`` for the same reason.)
    """
    return subdir if launcher_rank() == 0 else None
