"""The interface of a dataset source."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from visioncare.data.records import Record
from visioncare.errors import DataValidationError

log = logging.getLogger(__name__)


class DatasetSource(ABC):
    """Knows one dataset's layout; yields records, nothing about models or transforms.

    Attributes:
        name: short dataset name used in record keys and per-source metrics.
        is_synthetic: True for generated data (no warning about missing pretrained weights).
    """

    name: str = "dataset"
    is_synthetic: bool = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    @abstractmethod
    def load(self) -> dict[str, list[Record]]:
        """Records per split the dataset ships: ``train``, and ``test``/``val`` where it has them.

        A missing ``test`` or ``val`` is drawn by the datamodule (`records.hold_out`), not here.
        """

    def require_root(self) -> None:
        """Fail with an actionable message when ``data.root`` is missing."""
        if not self.root.is_dir():
            raise DataValidationError(
                f"data.root={str(self.root)!r} does not exist or is not a folder; "
                f"set data.root to where the {self.name} dataset was unpacked"
            )


def legacy_split_seed(source: Callable[..., Any], test_split_seed: int) -> tuple[Callable, int]:
    """The source factory without ``split_seed``, and the test seed it carried, if any.

    Checkpoints written before `data.test_split_seed` store the test hold-out's seed as
    `data.source.split_seed`; eval rebuilds the data from them and must find the same test set.
    """
    if not isinstance(source, partial) or "split_seed" not in source.keywords:
        return source, test_split_seed
    keywords = dict(source.keywords)
    seed = keywords.pop("split_seed")
    log.warning("data.source.split_seed=%s is now data.test_split_seed; using it as such", seed)
    # Same type and attributes: Hydra's partials carry its target policy.
    stripped = type(source)(source.func, *source.args, **keywords)
    stripped.__dict__.update(source.__dict__)
    return stripped, seed
