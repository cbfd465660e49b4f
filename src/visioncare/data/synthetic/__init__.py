"""Procedural synthetic colour fundus photographs, written in IDRiD's Disease Grading layout.

Why: the real IDRiD archive cannot be downloaded on the build machines, yet the whole pipeline
(loader, preprocessing, training, evaluation) must run end to end and learn something real. This
package draws fundus photographs whose labels come *only* from the lesions that are rendered, and
writes them exactly as IDRiD ships them, so the real IDRiD loader reads them unchanged.

One concern per module, each importing only modules listed above it (no cycles):

* `difficulty`: the `Difficulty` knobs and `DIFFICULTY_PRESETS` (``data.difficulty``).
* `grades`: which (DR, DME) pairs a split holds (IDRiD's proportions) and grader label noise.
* `anatomy`: field of view, optic disc, fovea and vessel tree of one eye.
* `lesions`: the clinical rules: which lesions the grades require, and where they go.
* `render`: a planned scene as pixels, with no grade leaking through global cues.
* `writer`: the IDRiD layout on disk (names from `visioncare.data.sources.idrid_layout`), the
  manifest, reuse and a safe install.

``python -m visioncare.data.synthetic ROOT`` builds a set from the shell (`__main__`). The names
below are the public API; the private helpers that tests reach live in their own modules.
"""

from __future__ import annotations

from visioncare.data.synthetic.difficulty import DIFFICULTY_PRESETS, Difficulty
from visioncare.data.synthetic.grades import (
    IDRID_TRAIN_COUNTS_DME,
    IDRID_TRAIN_COUNTS_DR,
    sample_grades,
)
from visioncare.data.synthetic.render import render_fundus
from visioncare.data.synthetic.writer import SYNTHETIC_MANIFEST, generate_synthetic_idrid

__all__ = [
    "DIFFICULTY_PRESETS",
    "IDRID_TRAIN_COUNTS_DME",
    "IDRID_TRAIN_COUNTS_DR",
    "SYNTHETIC_MANIFEST",
    "Difficulty",
    "generate_synthetic_idrid",
    "render_fundus",
    "sample_grades",
]
