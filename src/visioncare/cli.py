"""The entry points' Hydra wiring: config resolvers, instantiating config groups of named objects,
and running a task so that a user's mistake ends with one `ERROR:` line (exit 2)."""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import lightning as L
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from visioncare.composition import composition_error_message
from visioncare.config import register_resolvers
from visioncare.errors import VisionCareError

log = logging.getLogger("visioncare")

TRAINER_FLAGS = frozenset(inspect.signature(L.Trainer.__init__).parameters) - {"self"}

# Texts of other libraries that the messages below still read, each pinned by a fast test in
# tests/test_cli_errors.py that triggers the library's own error (pyproject pins the ranges).
# hydra-core 1.3.x (`_instantiate2._call_target`): an `InstantiationException` names the config
# node it was instantiating only in its message, as a line "full_key: trainer".
HYDRA_FULL_KEY = re.compile(r"full_key: (\S+)")
# lightning 2.6.x quotes a Trainer argument in backticks: "`max_epochs` must be a non-negative
# integer or -1. You passed in -3."
LIGHTNING_QUOTED_NAME = re.compile(r"`(\w+)`")
# CPython 3.10-3.13 (requires-python): "f() got an unexpected keyword argument 'colour'".
UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def _instantiated_key(error: InstantiationException) -> str:
    """The config node Hydra was instantiating (``trainer``, ``data``, ...), or ""."""
    found = HYDRA_FULL_KEY.search(str(error))
    return found.group(1) if found else ""


def user_error_message(error: BaseException, cfg: DictConfig | None = None) -> str | None:
    """The one-line message of a mistake in the config or the input, or None for a real bug.

    Told apart by exception type. Hydra's `instantiate` wraps whatever a constructor raises
    in an `InstantiationException`; the cause is what the user needs to read. Besides our own
    `VisionCareError`, config mistakes by construction are: a required ``???`` key left unset
    and an interpolation that names no key or resolver (OmegaConf's errors carry the
    `full_key`), and, raised by a constructor Hydra called, Lightning's
    `MisconfigurationException` from the Trainer's flags and an unknown keyword that the
    config holds (``+model.foo=1``). Anything else keeps its traceback.
    """
    key, wrapped = "", False
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        key, error, wrapped = _instantiated_key(error) or key, error.__cause__, True
    if isinstance(error, InterpolationResolutionError) and error.__cause__ is not None:
        error = error.__cause__  # raised by one of our resolvers (`${backbone_normalization:...}`)
    if isinstance(error, VisionCareError):
        return str(error)
    if isinstance(error, MissingMandatoryValue):  # a `???` key the command did not set
        return f"{error.full_key} is required: pass {error.full_key}=<value> on the command line"
    if isinstance(error, InterpolationResolutionError) and error.full_key:
        problem = str(error).splitlines()[0]  # OmegaConf's text; the lines below repeat the key
        return f"{error.full_key}: {problem}; fix the ${{...}} in its value"
    if not wrapped:
        return None
    if isinstance(error, MisconfigurationException):
        text = str(error)
        if key == "trainer":  # Lightning names its flags `max_epochs`; the user typed trainer.*
            text = LIGHTNING_QUOTED_NAME.sub(
                lambda m: f"`trainer.{m.group(1)}`" if m.group(1) in TRAINER_FLAGS else m.group(0),
                text,
            )
        return f"{key or 'config'}: {text}"
    unknown = UNEXPECTED_KEYWORD.search(str(error)) if isinstance(error, TypeError) else None
    if unknown:
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
