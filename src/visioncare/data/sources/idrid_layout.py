"""IDRiD Disease Grading's folder, file and column names: the one copy of the on-disk layout.

`IDRiDSource` reads this layout and the synthetic generator writes it, so both take the names
from here and cannot drift apart. A module of its own, importing nothing, because the generator's
spawned rendering workers import it too: the loader module pulls in pandas, which they never need.
"""

from __future__ import annotations

from typing import NamedTuple


class IDRiDSplit(NamedTuple):
    """Where one split lives: its image folder under `IMAGES`, its label CSV under `LABELS`."""

    images: str
    labels: str


GRADING = "B. Disease Grading"
IMAGES = "1. Original Images"
LABELS = "2. Groundtruths"
SPLITS: dict[str, IDRiDSplit] = {
    "train": IDRiDSplit("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv"),
    "test": IDRiDSplit("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv"),
}
COLUMNS = {"image": "Image name", "dr": "Retinopathy grade", "dme": "Risk of macular edema"}
