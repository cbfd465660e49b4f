"""Config plumbing shared by every task: the resolvers the YAML uses, and instantiating a config
group of named objects (callbacks, loggers). Importing this module registers the resolvers, so
configs composed outside the entry points (tests, notebooks, benchmarks) resolve too."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visioncare.models.net import backbone_normalization
from visioncare.runs.launcher import rank_zero_subdir, run_name
from visioncare.runs.resume import hydra_output_subdir, resume_run_dir


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
        "hydra_output_subdir": hydra_output_subdir,
        "rank_zero_subdir": rank_zero_subdir,
        "backbone_mean": lambda backbone: _normalization(backbone, "mean"),
        "backbone_std": lambda backbone: _normalization(backbone, "std"),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _normalization(backbone: str | None, which: str) -> list[float] | None:
    """`${backbone_mean:NAME}` / `${backbone_std:NAME}`: a timm backbone's input statistics."""
    values = backbone_normalization(backbone)
    return None if values is None else values[which]


register_resolvers()
