"""Finding and checking the checkpoint a run resumes from, and the run directory it belongs to."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from visioncare.errors import ConfigurationError
from visioncare.runs.launcher import rank_zero_subdir, slurm_run_name, timestamp

log = logging.getLogger("visioncare")

# The checkpoint entry holding the composed run config (plain dict; `RunConfigRecord`).
RUN_CONFIG_KEY = "visioncare_config"
# conf/hydra/default.yaml's fresh run directory ends with this; anything else was chosen on purpose.
FRESH_RUN_NAME = "${run_name:${task_name}}"


def newest_last_checkpoint(task_log_dir: str | Path) -> Path | None:
    """The most recently written `checkpoints/last.ckpt` under a task's log folder."""
    candidates = list(Path(task_log_dir).glob("**/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resume_run_dir(ckpt_path: str | None, task_log_dir: str, fresh_dir: str) -> str:
    """The checkpoint's own run directory when ``ckpt_path`` names a resume, else ``fresh_dir``.

    Continuing in the same directory keeps `metrics.csv`, `best.ckpt` and TensorBoard curves of
    the interrupted run together (a new directory would lose the best checkpoint's file).
    """
    if ckpt_path in (None, "", "None", "null"):
        return fresh_dir
    if ckpt_path == "last":
        path = newest_last_checkpoint(task_log_dir)
    else:
        path = Path(ckpt_path).expanduser()  # `~/...` like any other path
    if path is not None and path.is_file() and path.parent.name == "checkpoints":
        return str(path.resolve().parent.parent)
    return fresh_dir


class ResumeRunDir(Callback):
    """Hydra callback (conf/train.yaml): a resumed training continues in its checkpoint's run dir.

    Runs once the config is composed (so ``ckpt_path=last`` searches the task's real log folder)
    and before Hydra creates the run directory. A run directory given explicitly
    (``hydra.run.dir=...``, as Lightning's DDP launcher passes to the ranks it starts) is kept:
    only the default fresh ``runs/${run_name:${task_name}}`` is replaced. A ``ckpt_path`` that
    names no checkpoint leaves it too; the task then refuses it with one ERROR line.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run = config.hydra.run
        if FRESH_RUN_NAME not in str(OmegaConf.to_container(run, resolve=False)["dir"]):
            return
        task_log_dir = str(Path(config.paths.log_dir, config.task_name))
        resumed = resume_run_dir(config.get("ckpt_path"), task_log_dir, "")
        if resumed:
            with read_write(run):
                run.dir = resumed


def hydra_output_subdir(run_dir: str) -> str | None:
    """Hydra resolver: where this process writes the composed config inside ``run_dir``.

    `.hydra`, or `.hydra/resume-<time>` when the run directory already has one (a resumed or
    requeued run: the first run's config and overrides stay as they were); None on ranks other
    than 0, which share the directory (`rank_zero_subdir`).
    """
    first = Path(run_dir) / ".hydra" / "config.yaml"
    return rank_zero_subdir(f".hydra/resume-{timestamp()}" if first.is_file() else ".hydra")


def best_epoch_of(checkpoint: dict) -> int:
    """The epoch of the best checkpoint a training checkpoint records (-1: none selected yet)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and "best_epoch" in state:
            return int(state["best_epoch"])
    return -1


def carry_best_checkpoint(
    resume_from: str | Path, best_path: str | Path, copy: bool = True
) -> None:
    """Resuming into another directory: bring the run's best checkpoint along, before training.

    The resumed run keeps the original best score, so if no later epoch beats it nothing writes
    ``best_path`` and the final test would find no file. The original's ``best.ckpt`` (beside the
    resumed ``last.ckpt``) is copied to ``best_path``; a run whose best checkpoint is missing is
    refused now, not after every epoch has trained. ``copy=False`` (ranks other than 0) only
    checks, so under DDP every rank refuses alike and one process writes.
    """
    resume_from, best_path = Path(resume_from).resolve(), Path(best_path).resolve()
    # Beside a last.ckpt, or in checkpoints/ below the run directory where Lightning writes a
    # requeued SLURM job's hpc_ckpt_<n>.ckpt.
    candidates = [resume_from.parent / best_path.name]
    candidates.append(resume_from.parent / "checkpoints" / best_path.name)
    source = next((c for c in candidates if c.is_file()), candidates[0])
    if source.is_file():
        if copy and source != best_path:
            best_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, best_path)
            log.info("Resuming into %s: copied the best checkpoint %s", best_path.parent, source)
        return
    epoch = best_epoch_of(_load(resume_from))
    if epoch < 0:
        return
    raise ConfigurationError(
        f"ckpt_path={str(resume_from)!r} records a best checkpoint (epoch {epoch}) but "
        f"{source} does not exist; put that run's {best_path.name} beside the checkpoint "
        "you resume from (copy or move the whole run folder), then resume again"
    )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def resolve_ckpt_path(ckpt_path: str | None, task_log_dir: str | Path) -> str | None:
    """The checkpoint to resume from: an existing VisionCare checkpoint, ``last`` or None.

    ``last`` means the newest `checkpoints/last.ckpt` of this task's earlier runs. A missing
    file or a file that is not a VisionCare checkpoint is an error, never a silent fresh start.
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        newest = newest_last_checkpoint(task_log_dir)
        if newest is None:
            raise ConfigurationError(
                f"ckpt_path=last: no checkpoints/last.ckpt under {task_log_dir}; "
                "give the checkpoint's path instead"
            )
        path = newest
    else:
        path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"ckpt_path={ckpt_path!r} does not exist; give an existing checkpoint "
            "(<run>/checkpoints/last.ckpt) or ckpt_path=null for a fresh run"
        )
    check_visioncare_checkpoint(path)
    return str(path)


def check_visioncare_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights only) and check it was written by VisionCare."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated file, not a torch file, unsafe pickle
        raise ConfigurationError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(exc).__name__}); "
            "pass a VisionCare last.ckpt or best.ckpt"
        ) from None
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    # VisionCareModule's own: its constructor arguments name a backbone, its weights sit under net.
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "backbone" not in hparams or not any(k.startswith("net.") for k in state):
        raise ConfigurationError(
            f"ckpt_path={str(path)!r} is not a VisionCare checkpoint (no VisionCare model state); "
            "pass a VisionCare last.ckpt or best.ckpt"
        )
    return checkpoint


def requeue_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a requeued SLURM job continues from: the newest in its own run directory.

    That is Lightning's `hpc_ckpt_<n>.ckpt` (written when SLURM sends the requeue signal) or
    VisionCare's `checkpoints/last.ckpt` (written every epoch; all there is after a node
    failure or a preemption without warning). Outside SLURM, None: a fresh run never resumes
    by itself.
    """
    if slurm_run_name() is None:
        return None
    run_dir = Path(run_dir)
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def requeued_or_given(run_dir: str | Path, ckpt_path: str | None) -> str | None:
    """`ckpt_path`, unless this is a requeued SLURM job with a checkpoint of its own to go on from.

    A first start honours the `ckpt_path` given (resume from an earlier point, say). A requeued
    job runs the same command again; going back to that `ckpt_path` would throw away everything
    trained since, so once SLURM has restarted the job (`SLURM_RESTART_COUNT` > 0) the run
    directory's newest checkpoint wins. Without a `ckpt_path` it is used from the first start.
    """
    requeued = requeue_checkpoint(run_dir)
    if requeued is None:
        return ckpt_path
    if ckpt_path is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return str(requeued)
    return ckpt_path


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint a training run starts from: `ckpt_path` checked, or a requeued job's own.

    `ckpt_path` must exist and be a VisionCare checkpoint (`resolve_ckpt_path`); a requeued SLURM
    job goes on from its own newest checkpoint instead (`requeued_or_given`).
    """
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir, cfg.task_name))
    resume = requeued_or_given(cfg.paths.output_dir, ckpt_path)
    if resume != ckpt_path:
        log.info("SLURM job requeued: resuming from its own %s", resume)
    return resume
