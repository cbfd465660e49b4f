"""The interface of a dataset source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from visioncare.data.records import Record
from visioncare.errors import DataValidationError


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
