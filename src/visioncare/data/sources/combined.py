"""Several datasets trained together, e.g. IDRiD (DR + DME) with APTOS (DR only).

Each child keeps its own records: a label a dataset does not have stays -1 and is masked out of
that task's loss. A child's shipped splits are kept; the test split (for children without one)
and validation are drawn per source by the datamodule, with the same `data.test_fraction`,
`data.test_split_seed`, `data.val_fraction` and `data.split_seed` for every child, so metrics
are reported per source (`val/<source>/acc_dr`) as well as overall.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.base import DatasetSource
from visioncare.errors import ConfigurationError


class CombinedSource(DatasetSource):
    """The union of several sources' splits.

    Args:
        root: unused beyond logging (each child has its own root).
        sources: name → source (as configured under `data.source.sources`).
    """

    name = "combined"

    def __init__(self, root: str | Path, sources: Mapping[str, DatasetSource]) -> None:
        super().__init__(root)
        if not sources:
            raise ConfigurationError("data.source.sources is empty; list at least one dataset")
        self.sources = dict(sources)
        self.is_synthetic = all(s.is_synthetic for s in self.sources.values())

    def load(self) -> dict[str, list[Record]]:
        merged: dict[str, list[Record]] = {"train": [], "test": []}
        for source in self.sources.values():
            for split, records in source.load().items():
                merged.setdefault(split, []).extend(records)
        return merged
