"""Evaluate a checkpoint: `python src/eval.py ckpt_path=<ckpt> [data=...] [tta=true]
[+data@datasets.<name>=<data config> ...]`.

See conf/eval.yaml and `visioncare.tasks.evaluate`.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(evaluate.run, cfg)


if __name__ == "__main__":
    run_main(main)
