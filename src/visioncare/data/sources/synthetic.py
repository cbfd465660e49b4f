"""The built-in synthetic fundus dataset, generated on first use and read back as IDRiD.

The generator (`visioncare.data.synthetic`) writes IDRiD's own layout under `data.root`, so the
default run exercises exactly the loader used for real IDRiD data.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from visioncare.data.records import Record
from visioncare.data.sources.idrid import IDRiDSource
from visioncare.data.synthetic.difficulty import DIFFICULTY_PRESETS, Difficulty
from visioncare.data.synthetic.writer import generate_synthetic_idrid
from visioncare.errors import ConfigurationError


class SyntheticSource(IDRiDSource):
    """Procedural fundus photographs with lesion-derived DR/DME grades (IDRiD layout on disk).

    Args:
        root: where the set is written and found again (reused when the parameters match).
        num_train: training images (IDRiD has 413).
        num_test: test images (IDRiD has 103).
        render_size: side of the rendered square images, in pixels.
        generator_seed: generator seed (independent of the training seed).
        num_workers: rendering processes (None = all cores).
        difficulty: a preset name (`DIFFICULTY_PRESETS`: standard, moderate, hard).
        label_noise: grader label-noise rate overriding the preset's (None = the preset's).
    """

    name = "synthetic"
    is_synthetic = True

    def __init__(
        self,
        root: str | Path,
        num_train: int = 413,
        num_test: int = 103,
        render_size: int = 512,
        generator_seed: int = 0,
        num_workers: int | None = None,
        difficulty: str = "standard",
        label_noise: float | None = None,
    ) -> None:
        super().__init__(root)
        self.difficulty = resolve_difficulty(difficulty, label_noise)
        self.num_train = num_train
        self.num_test = num_test
        self.render_size = render_size
        self.generator_seed = generator_seed
        self.num_workers = num_workers

    def load(self) -> dict[str, list[Record]]:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        generate_synthetic_idrid(
            self.root,
            num_train=self.num_train,
            num_test=self.num_test,
            image_size=self.render_size,
            seed=self.generator_seed,
            num_workers=self.num_workers,
            difficulty=self.difficulty,
        )
        return super().load()


def resolve_difficulty(name: str, label_noise: float | None = None) -> Difficulty:
    """The named preset, with ``label_noise`` replacing its rate when given."""
    if name not in DIFFICULTY_PRESETS:
        raise ConfigurationError(
            f"data.difficulty={name!r} is not a preset; choose one of {sorted(DIFFICULTY_PRESETS)}"
        )
    preset = DIFFICULTY_PRESETS[name]
    if label_noise is None:
        return preset
    try:
        return Difficulty(**{**asdict(preset), "label_noise": float(label_noise)})
    except ValueError as error:
        raise ConfigurationError(f"data.label_noise={label_noise}: {error}") from None
