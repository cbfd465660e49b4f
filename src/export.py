"""Export a checkpoint: `python src/export.py ckpt_path=<ckpt> output_dir=<dir>`.

See conf/export.yaml for the options and `visioncare.tasks.export` for the logic.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import export  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="export")
def main(cfg: DictConfig) -> None:
    run_task(export.run, cfg)


if __name__ == "__main__":
    run_main(main)
