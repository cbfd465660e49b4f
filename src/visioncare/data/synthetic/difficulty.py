"""How hard a synthetic set is to grade: the `Difficulty` knobs and their named presets.

A module of its own because every stage reads it: lesion planning (counts, sizes), drawing
(opacity, camera spread) and the writer (grader label noise; a non-standard difficulty is part of
the parameters a stored set must match).

Why (``data.difficulty``): the ``standard`` set is easy for a pretrained network (val accuracy
near 0.97), so recipe arms cannot differ on it. Harder presets draw smaller, fainter lesions,
fewer of them (counts pulled towards each grade's minimum, i.e. close to the boundary with the
grade below), vary the camera more, and may add grader label noise: at a stated rate a written
grade moves to a neighbouring grade (real graders disagree, kappa 0.7-0.8 on DR). The pixels
still follow the clinical rules for the rendered grades; only the written labels carry the noise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difficulty:
    """How hard the rendered set is to grade (the standard values reproduce version 1 exactly).

    Attributes:
        lesion_scale: multiplier on the radius of dots, blots, exudates and cotton-wool spots.
        lesion_opacity: 1 = lesions drawn at full strength; lower = fainter (blended back
            towards the lesion-free retina).
        sparsity: 0 = lesion counts drawn from each grade's full range; 1 = always the
            grade's minimum (e.g. 5 haemorrhages per quadrant for severe NPDR).
        camera: spread of the camera's exposure, colour gains, contrast, gamma, blur, noise
            and illumination gradient, relative to the standard ranges.
        label_noise: share of written grades moved to a neighbouring grade (per task).
    """

    lesion_scale: float = 1.0
    lesion_opacity: float = 1.0
    sparsity: float = 0.0
    camera: float = 1.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "lesion_scale": 0.3 <= self.lesion_scale <= 1.0,
            "lesion_opacity": 0.1 <= self.lesion_opacity <= 1.0,
            "sparsity": 0.0 <= self.sparsity <= 1.0,
            "camera": 0.0 <= self.camera <= 3.0,
            "label_noise": 0.0 <= self.label_noise <= 0.5,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "difficulty values out of range: "
                + ", ".join(f"{b}={getattr(self, b)}" for b in bad)
                + " (lesion_scale 0.3-1, lesion_opacity 0.1-1, sparsity 0-1, camera 0-3, "
                "label_noise 0-0.5)"
            )

    @property
    def is_standard(self) -> bool:
        return self == Difficulty()


DIFFICULTY_PRESETS: dict[str, Difficulty] = {
    "standard": Difficulty(),
    # Subtle lesions near the grade boundaries, a wider camera range, no label noise.
    "moderate": Difficulty(lesion_scale=0.8, lesion_opacity=0.7, sparsity=0.6, camera=1.5),
    # As moderate but fainter still, and 10 % of grades moved to a neighbour by the "grader".
    "hard": Difficulty(
        lesion_scale=0.75, lesion_opacity=0.55, sparsity=0.8, camera=1.8, label_noise=0.1
    ),
}
