"""Hydra wiring: instantiate config groups of named objects; run a task with friendly errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visioncare.errors import VisionCareError
from visioncare.utils.checkpoints import resume_run_dir
from visioncare.utils.launcher import hydra_output_subdir, run_name

log = logging.getLogger("visioncare")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` (callbacks, loggers), in config order."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def register_resolvers() -> None:
    """Resolvers the configs use; called by the entry points before Hydra composes."""
    resolvers = {
        "resume_run_dir": resume_run_dir,
        "run_name": run_name,
        "rank_zero_subdir": hydra_output_subdir,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an entry point's task; a `VisionCareError` ends the process with its message only.

    Bad input must read as an instruction, not as a traceback from OpenCV, pandas or PyTorch.
    """
    try:
        return task(cfg)
    except VisionCareError as error:
        log.error("%s", error)
        print(f"\nERROR: {error}", file=sys.stderr)
        sys.exit(2)
