"""Config plumbing shared by every task: the resolvers the YAML uses, and instantiating a config
group of named objects (callbacks, loggers). Importing this module registers the resolvers, so
configs composed outside the entry points (tests, notebooks, benchmarks) resolve too.

The resolvers, each needed where plain interpolation cannot do it:

- ``${run_name:${task_name}}``: the run directory's name; for training the same on every rank of
  one launch and across a SLURM requeue (Hydra resolves `hydra.run.dir` in each process before any
  task code runs), for the single-process tasks a timestamp.
- ``${hydra_output_subdir:<run dir>}``: where the composed config goes (`.hydra`, or
  `.hydra/resume-<time>` in a resumed run's directory; none on ranks other than 0); Hydra writes
  it before any task code runs.
- ``${backbone_normalization:<backbone>,mean|std}``: a timm backbone's input statistics, so the
  composed config (and `.hydra/config.yaml`) records the normalisation that ran, and the
  datamodule needs nothing from the model.

Where a resumed training runs is decided in code, not here: `visioncare.runs.resume.ResumeRunDir`.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visioncare.models.net import backbone_normalization
from visioncare.runs.launcher import run_name
from visioncare.runs.resume import hydra_output_subdir


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` (callbacks, loggers), in config order."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def register_resolvers() -> None:
    """Resolvers the configs use (see the module doc); called before Hydra composes."""
    resolvers = {
        "run_name": run_name,
        "hydra_output_subdir": hydra_output_subdir,
        "backbone_normalization": _normalization,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _normalization(backbone: str | None, which: str) -> list[float] | None:
    """`${backbone_normalization:NAME,mean}`: a timm backbone's mean (or std), None if unknown."""
    values = backbone_normalization(backbone)
    return None if values is None else values[which]


register_resolvers()
