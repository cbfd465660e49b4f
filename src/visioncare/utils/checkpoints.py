"""Finding and checking the checkpoint a run resumes from, and the run directory it belongs to."""

from __future__ import annotations

from pathlib import Path

import torch

from visioncare.errors import ConfigurationError


def newest_last_checkpoint(task_log_dir: str | Path) -> Path | None:
    """The most recently written `checkpoints/last.ckpt` under a task's log folder."""
    candidates = list(Path(task_log_dir).glob("**/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resume_run_dir(ckpt_path: str | None, task_log_dir: str, fresh_dir: str) -> str:
    """Hydra resolver: resume inside the checkpoint's own run directory, else a fresh one.

    Continuing in the same directory keeps `metrics.csv`, `best.ckpt` and TensorBoard curves of
    the interrupted run together (a new directory would lose the best checkpoint's file).
    """
    if ckpt_path in (None, "", "None", "null"):
        return fresh_dir
    path = newest_last_checkpoint(task_log_dir) if ckpt_path == "last" else Path(ckpt_path)
    if path is not None and path.is_file() and path.parent.name == "checkpoints":
        return str(path.resolve().parent.parent)
    return fresh_dir


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
    if "visioncare_data_config" not in checkpoint or not any(k.startswith("net.") for k in state):
        raise ConfigurationError(
            f"ckpt_path={str(path)!r} is not a VisionCare checkpoint (no VisionCare model state); "
            "pass a VisionCare last.ckpt or best.ckpt"
        )
    return checkpoint
