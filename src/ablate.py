"""Ablate the recipe: `python src/ablate.py [seeds=[0,1,2]] [common=[...]]` (conf/ablate.yaml).

Arms × seeds of `src/train.py`, then ablation.csv / ablation.md; see `visioncare.tasks.ablate`.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import ablate  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="ablate")
def main(cfg: DictConfig) -> None:
    run_task(ablate.run, cfg)


if __name__ == "__main__":
    run_main(main)
