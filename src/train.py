"""Train VisionCare: `python src/train.py [overrides]` (see conf/train.yaml and the README)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import train  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_task(train.run, cfg)
    return metrics.get(cfg.get("optimized_metric")) if metrics else None


if __name__ == "__main__":
    run_main(main)
