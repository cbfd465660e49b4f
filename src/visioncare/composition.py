"""Hydra's config composition from code, and its mistakes as one line.

The entry points compose through `@hydra.main`; `ablate.py` also composes the train config of
every arm with Hydra's compose API before any job starts, so a bad override fails at once and
reads the same as it would on `train.py`'s command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


def compose_config(config_dir: Path, config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``config_name`` from ``config_dir`` with ``overrides``, as `train.py` would compose it.

    Raises Hydra's own errors (`ConfigCompositionException`, `OverrideParseException`). Inside a
    running `@hydra.main` app Hydra is already initialised for that app; it is set aside for
    the compose and restored after it.
    """
    running = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)


def composition_error_message(error: Exception, script: str | None = None) -> str:
    """Hydra's multi-line message for a bad override or group option, as one line.

    Told apart by type, not by Hydra's wording: a group option that does not exist is a
    `MissingConfigException` carrying the options; a key that is not in the config is the
    OmegaConf `ConfigAttributeError`/`ConfigKeyError` (with its `full_key`) that Hydra's
    override raised. Anything else (``+key`` on an existing key, unparsable syntax) is
    Hydra's own text on one line. ``script`` names the entry point for the "all keys" hint.
    """
    if isinstance(error, MissingConfigException):
        first = str(error).strip().splitlines()[0]  # the rest is Hydra's search path: noise
        if not error.options or not error.missing_cfg_file:
            return first
        group = error.missing_cfg_file.rsplit("/", 1)[0]
        return (
            f"Could not find '{error.missing_cfg_file}'; available options in '{group}': "
            f"{', '.join(error.options)}"
        )
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = cause.full_key
        script = script or Path(sys.argv[0]).name
        return (
            f"{key} is not a config key: check its spelling (all keys: "
            f"`python src/{script} --cfg job`), or add a new key with +{key}=..."
        )
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())
