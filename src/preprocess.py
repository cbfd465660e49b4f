"""Show what the network sees: `python src/preprocess.py input=<dir|glob|csv> output_dir=<dir>`.

See conf/preprocess.yaml and `visioncare.tasks.preprocess`.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from visioncare.cli import run_main, run_task  # noqa: E402
from visioncare.tasks import preprocess  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="preprocess")
def main(cfg: DictConfig) -> None:
    run_task(preprocess.run, cfg)


if __name__ == "__main__":
    run_main(main)
