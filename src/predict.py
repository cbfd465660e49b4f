"""Predict DR/DME grades: `python src/predict.py ckpt_path=<ckpt> input=<dir|glob|csv>`.

See conf/predict.yaml for the options and `visioncare.tasks.predict` for the logic.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import predict  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="predict")
def main(cfg: DictConfig) -> None:
    run_task(predict.run, cfg)


if __name__ == "__main__":
    run_main(main)
