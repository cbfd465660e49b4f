"""Shared fixtures: the real Hydra config, composed and shrunk for fast CPU tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from visioncare.composition import compose_config
from visioncare.tasks.train import run as train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))

# Small everything: a whole training run takes seconds on 2 CPU cores.
TINY_OVERRIDES = [
    "model=tiny",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.enable_model_summary=false",
    "data.image_size=64",
    "data.cache_size=72",
    "data.batch_size=8",
    "data.num_workers=0",
    "callbacks.progress_bar=null",
]
SYNTHETIC_OVERRIDES = ["data.num_train=40", "data.num_test=16", "data.render_size=128"]


def compose_run(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/<config_name>.yaml composed as its entry point would, writing into ``output_dir``."""
    cfg = compose_config(CONF, config_name, overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic set for the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("synthetic") / "set"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, cache_dir: Path
) -> Path:
    """best.ckpt of one epoch of `model=tiny` on the small synthetic set, trained once per session.

    Shared read-only by the eval, predict and export tests.
    """
    tmp = tmp_path_factory.mktemp("tiny_checkpoint")
    overrides = [
        *TINY_OVERRIDES,
        *SYNTHETIC_OVERRIDES,
        f"data.root={synthetic_root}",
        f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={tmp / 'logs'}",
        "trainer.max_epochs=1",
        "logger=none",
        "test=false",
    ]
    train(compose_run("train", overrides, tmp / "run"))
    return tmp / "run" / "checkpoints" / "best.ckpt"


@pytest.fixture
def make_cfg(tmp_path: Path, synthetic_root: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with the tiny overrides plus ``extra``; outputs under tmp_path.

    The synthetic set's size keys are added unless ``extra`` selects another dataset.
    """

    def _make(*extra: str, config_name: str = "train") -> DictConfig:
        other_data = any(o.startswith("data=") or "idrid" in o for o in extra)
        synthetic = [] if other_data else SYNTHETIC_OVERRIDES
        overrides = [
            *TINY_OVERRIDES,
            *synthetic,
            f"data.root={synthetic_root}",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            *extra,
        ]
        return compose_run(config_name, overrides, tmp_path / "run")

    return _make


def predict_cfg(tmp_path: Path, ckpt: Path, source: str | Path, *extra: str) -> DictConfig:
    """conf/predict.yaml for ``ckpt`` on ``source``: CPU, no workers, outputs under tmp_path."""
    overrides = [
        f"ckpt_path={ckpt}", f"input={source}", "num_workers=0", "batch_size=2",
        "device=cpu", f"paths.log_dir={tmp_path / 'logs'}", *extra,
    ]  # fmt: skip
    return compose_run("predict", overrides, tmp_path / "run")
