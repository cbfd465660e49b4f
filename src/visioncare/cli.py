"""The entry points' Hydra wiring: config resolvers, instantiating config groups of named objects,
and running a task so that a user's mistake ends with one `ERROR:` line (exit 2)."""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from visioncare.config import register_resolvers
from visioncare.errors import VisionCareError

log = logging.getLogger("visioncare")

TRAINER_FLAGS = frozenset(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _full_key(error: InstantiationException) -> str:
    """The config node Hydra was instantiating (``trainer``, ``data``, ...), from its message."""
    found = re.search(r"full_key: (\S+)", str(error))
    return found.group(1) if found else ""


def user_error_message(error: BaseException, cfg: DictConfig | None = None) -> str | None:
    """The one-line message of a mistake in the config or the input, or None for a real bug.

    Hydra's `instantiate` wraps whatever a constructor raises in an `InstantiationException`;
    the cause is what the user needs to read. Besides our own `VisionCareError`, two causes are
    config mistakes by construction: Lightning's `MisconfigurationException` from the Trainer's
    flags, and an unknown keyword that the config holds (``+model.foo=1``); so is a required
    ``???`` key left unset. Anything else keeps its traceback.
    """
    if isinstance(error, InterpolationResolutionError) and error.__cause__ is not None:
        error = error.__cause__  # raised by one of our resolvers (`${backbone_normalization:...}`)
    if isinstance(error, VisionCareError):
        return str(error)
    if isinstance(error, MissingMandatoryValue):  # a `???` key the command did not set
        return f"{error.full_key} is required: pass {error.full_key}=<value> on the command line"
    if not isinstance(error, InstantiationException) or error.__cause__ is None:
        return None
    key = _full_key(error)
    cause = error.__cause__
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        key, cause = _full_key(cause) or key, cause.__cause__
    if isinstance(cause, VisionCareError):
        return str(cause)
    if isinstance(cause, MisconfigurationException):
        text = str(cause)
        if key == "trainer":  # Lightning names its flags `max_epochs`; the user typed trainer.*
            text = re.sub(
                r"`(\w+)`",
                lambda m: f"`trainer.{m.group(1)}`" if m.group(1) in TRAINER_FLAGS else m.group(0),
                text,
            )
        return f"{key or 'config'}: {text}"
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if isinstance(cause, TypeError) and unknown:
        name = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        if cfg is not None and OmegaConf.select(cfg, name, default=None) is None:
            return None  # not a key the user set: our own call is wrong, a bug
        return f"{name} is not a known key here; check its spelling or remove it"
    return None


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an entry point's task; a user's mistake ends the process with one `ERROR:` line, exit 2.

    Bad input must read as an instruction, not as a traceback from OpenCV, pandas or PyTorch,
    also when it was raised inside an object Hydra instantiates. Real bugs keep their traceback
    (the cause itself, not Hydra's one-line wrapper of it).
    """
    try:
        return task(cfg)
    except Exception as error:
        message = user_error_message(error, cfg)
        if message is None:
            if isinstance(error, InstantiationException) and error.__cause__ is not None:
                raise error.__cause__ from None
            raise
        log.error("%s", message)
        print(f"\nERROR: {message}", file=sys.stderr)
        sys.exit(2)


def composition_error_message(error: Exception) -> str:
    """Hydra's multi-line message for a bad override or group option, as one line.

    ``data.batchsize=8`` names the key and the way to add one; ``model=nope`` lists the
    available options (Hydra's config search path, noise to a user, is dropped).
    """
    text = str(error).split("Config search path")[0]
    options = re.search(r"Available options in '([^']+)':((?:\s*\t[^\n]+)+)", text)
    if options:
        names = ", ".join(line.strip() for line in options.group(2).splitlines() if line.strip())
        text = text[: options.start()] + f"Available options in '{options.group(1)}': {names}"
    cause = error.__cause__
    if cause is not None and "not in struct" in str(cause):
        key = re.search(r"Could not override '([^']+)'", text)
        if key:
            script = Path(sys.argv[0]).name
            return (
                f"{key.group(1)} is not a config key: check its spelling (all keys: "
                f"`python src/{script} --cfg job`), or add a new key with +{key.group(1)}=..."
            )
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point's `@hydra.main` function; a bad override is one `ERROR:` line, exit 2.

    Mistakes in the command line itself (an unknown key, a group option that does not exist,
    unparsable syntax) are found by Hydra while composing, before `run_task` runs. Hydra prints
    them with a hint about HYDRA_FULL_ERROR and exits 1; with HYDRA_FULL_ERROR=1 it raises them
    instead, which lets them end like every other configuration mistake. Real bugs then print
    their full traceback.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register_resolvers()  # before Hydra composes the config that uses them
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        message = composition_error_message(error)
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(2)
