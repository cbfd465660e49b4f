"""Clinical lesion rules: which lesions a pair of grades requires, and where they go (no pixels).

The labels follow from this plan alone. Rules (ICDR scale for DR; DME graded as IDRiD does):

* DR 0: no lesions at all.
* DR 1 (mild NPDR): microaneurysms only (2-6 small dark-red dots).
* DR 2 (moderate NPDR): microaneurysms plus 3-8 dot/blot/flame haemorrhages, sometimes
  cotton-wool spots; hard exudates only when DME > 0. Never enough haemorrhages for the 4-2-1 rule.
* DR 3 (severe NPDR): at least 5 haemorrhages in *each* of the four quadrants around the fovea
  (the 4-2-1 rule's first arm) plus venous beading on (usually two or three) main veins.
* DR 4 (PDR): a DR-3 background plus neovascularisation (at the disc or elsewhere) and/or a
  pre-retinal (boat-shaped) haemorrhage.
* DME is decided by hard exudates only, measured in optic-disc diameters (DD) from the fovea:
  0 none anywhere; 1 present but every exudate farther than 1 DD; 2 at least one within 1 DD.
  DME > 0 requires DR >= 2, and DR >= 2 with DME 0 has no hard exudates.

Hard exudates are planned first and the large lesions keep clear of them (`render` also draws
them last), so the signs that decide DME are never hidden; every lesion lies inside the visible
field. Lesion sizes are relative to the image size so they survive resizing to 224 px (a
microaneurysm keeps a radius of >= 1.1 px there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visioncare.data.synthetic.anatomy import _Geometry, _Vessel
from visioncare.data.synthetic.difficulty import Difficulty
from visioncare.data.synthetic.grades import _check_grades


def _count(rng: np.random.Generator, low: int, high: int, sparsity: float) -> int:
    """An integer in [low, high), the range shrunk towards ``low`` by ``sparsity``."""
    top = high if sparsity == 0 else low + max(1, round((high - low) * (1 - sparsity)))
    return int(rng.integers(low, top))


@dataclass
class _Lesion:
    """One drawn lesion; ``radius`` is in pixels, ``params`` holds shape details."""

    kind: str
    x: float
    y: float
    radius: float
    params: dict[str, Any] = field(default_factory=dict)


LESION_KINDS = (
    "microaneurysm",
    "haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
    "venous_beading",
    "neovascularisation",
    "preretinal_haemorrhage",
)


class _Placer:
    """Rejection sampler for lesion centres: inside the visible field, clear of the disc.

    Dots sitting on a vessel would be invisible, so small lesions also keep clear of vessels.
    """

    def __init__(self, geom: _Geometry, vessels: Sequence[_Vessel], rng: np.random.Generator):
        self.geom = geom
        self.rng = rng
        big = [v for v in vessels if v.widths.max() >= 1.0]
        self._vessel_pts = np.concatenate([v.points for v in big]) if big else np.zeros((0, 2))
        self._vessel_half = np.concatenate([v.widths / 2 for v in big]) if big else np.zeros(0)

    def _clear_of_vessels(self, x: float, y: float, clearance: float) -> bool:
        if len(self._vessel_pts) == 0:
            return True
        d = np.hypot(self._vessel_pts[:, 0] - x, self._vessel_pts[:, 1] - y) - self._vessel_half
        return bool(d.min() > clearance)

    def sample(
        self,
        size: float,
        quadrant: int | None = None,
        near: tuple[tuple[float, float], float, float] | None = None,
        disc_clearance_dd: float = 0.75,
        fovea_clearance_dd: float = 0.0,
        avoid_vessels: bool = True,
        avoid: Sequence[tuple[float, float, float]] = (),
        tries: int = 400,
    ) -> tuple[float, float] | None:
        """A centre satisfying every constraint, or None if none was found.

        Args:
            size: Lesion radius in px (kept inside the field and off vessels).
            quadrant: Required quadrant around the fovea.
            near: ((x, y), min_dist, max_dist) annulus in px to sample in.
            disc_clearance_dd: Minimum distance from the disc centre, in DD.
            fovea_clearance_dd: Minimum distance from the fovea (edge of lesion), in DD.
            avoid: (x, y, r) discs the lesion must not overlap.
        """
        g = self.geom
        cx, cy = g.centre
        for _ in range(tries):
            if near is not None:
                (nx, ny), rmin, rmax = near
                r = math.sqrt(self.rng.uniform(rmin**2, rmax**2))
                a = self.rng.uniform(0.0, 2 * math.pi)
                x, y = nx + r * math.cos(a), ny + r * math.sin(a)
            else:
                r = g.radius * math.sqrt(self.rng.random())
                a = self.rng.uniform(0.0, 2 * math.pi)
                x, y = cx + r * math.cos(a), cy + r * math.sin(a)
            if not g.visible(x, y, margin=size + 0.03 * g.size):
                continue
            if quadrant is not None and g.quadrant(x, y) != quadrant:
                continue
            if g.dist_dd(x, y, g.disc) < disc_clearance_dd + size / g.disc_diameter:
                continue
            if g.dist_dd(x, y, g.fovea) - size / g.disc_diameter < fovea_clearance_dd:
                continue
            if any(math.hypot(x - ax, y - ay) < ar + size + 1.0 for ax, ay, ar in avoid):
                continue
            if avoid_vessels and not self._clear_of_vessels(x, y, size * 0.5 + 1.0):
                continue
            return x, y
        return None


def _haemorrhage(
    placer: _Placer, rng: np.random.Generator, quadrant: int | None, avoid: list
) -> _Lesion | None:
    """A dot, blot (cluster of ellipses) or flame (radially oriented streak) haemorrhage."""
    g = placer.geom
    r = rng.uniform(0.01, 0.02) * g.size
    pos = placer.sample(r, quadrant=quadrant, avoid_vessels=False, avoid=avoid)
    if pos is None:
        return None
    x, y = pos
    shape = str(rng.choice(["dot", "blot", "flame"], p=[0.35, 0.45, 0.2]))
    if shape == "dot":
        parts = [(0.0, 0.0, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, math.pi))]
    elif shape == "blot":
        parts = [(0.0, 0.0, r * 0.8, r * rng.uniform(0.6, 0.8), rng.uniform(0, math.pi))]
        for _ in range(int(rng.integers(2, 5))):
            a = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.2, 0.45) * r
            parts.append(
                (
                    d * math.cos(a),
                    d * math.sin(a),
                    r * rng.uniform(0.4, 0.6),
                    r * rng.uniform(0.3, 0.5),
                    rng.uniform(0, math.pi),
                )
            )
    else:  # flame: along the nerve fibres, i.e. roughly radial from the disc
        angle = math.atan2(y - g.disc[1], x - g.disc[0]) + rng.normal(0.0, 0.2)
        parts = [(0.0, 0.0, r * rng.uniform(1.4, 1.9), r * rng.uniform(0.4, 0.55), angle)]
    return _Lesion(
        "haemorrhage",
        x,
        y,
        r,
        {"shape": shape, "parts": parts, "darkness": rng.uniform(0.85, 1.0)},
    )


def _plan_exudates(
    placer: _Placer, rng: np.random.Generator, dme_grade: int, avoid: list, sparsity: float = 0.0
) -> list[_Lesion]:
    """Hard exudate spots (one lesion per spot) obeying the DME distance rule.

    DME 2: a cluster (or circinate ring) around a point within 0.6 DD of the fovea, with at
    least one spot centre within 0.85 DD. DME 1: clusters whose every spot edge stays at least
    1.2 DD from the fovea. The margins keep the label unambiguous after blur and resizing.
    """
    g = placer.geom
    dd = g.disc_diameter
    spots: list[_Lesion] = []

    def spot(x: float, y: float, r: float) -> _Lesion:
        return _Lesion("hard_exudate", x, y, r, {"tone": rng.uniform(0.9, 1.05)})

    def add_cluster(centre: tuple[float, float], spread: float, count: int, far: bool) -> None:
        circinate = rng.random() < 0.3
        ring = rng.uniform(0.35, 0.6) * dd
        for _ in range(count):
            r = rng.uniform(0.0045, 0.009) * g.size
            if circinate:
                a = rng.uniform(0, 2 * math.pi)
                d = ring * rng.uniform(0.85, 1.15)
                x, y = centre[0] + d * math.cos(a), centre[1] + d * math.sin(a)
            else:
                x, y = centre + rng.normal(0.0, spread, size=2)
            if not g.visible(x, y, margin=r + 1.0) or g.dist_dd(x, y, g.disc) < 0.75:
                continue
            if far and g.dist_dd(x, y, g.fovea) - r / dd < 1.2:
                continue
            spots.append(spot(float(x), float(y), r))

    if dme_grade == 2:
        centre = placer.sample(0.0, near=(g.fovea, 0.0, 0.6 * dd), disc_clearance_dd=1.0)
        centre = centre or g.fovea
        add_cluster(centre, rng.uniform(0.15, 0.35) * dd, _count(rng, 5, 14, sparsity), far=False)
        if not any(g.dist_dd(s.x, s.y, g.fovea) <= 0.85 for s in spots):
            a = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.1, 0.6) * dd
            r = rng.uniform(0.006, 0.009) * g.size
            spots.append(spot(g.fovea[0] + d * math.cos(a), g.fovea[1] + d * math.sin(a), r))
        extra_clusters = _count(rng, 0, 3, sparsity)
    else:
        extra_clusters = _count(rng, 1, 4, sparsity)
    for _ in range(extra_clusters):
        centre = placer.sample(
            0.3 * dd, fovea_clearance_dd=1.5, avoid_vessels=False, near=(g.fovea, 0, 4.5 * dd)
        )
        if centre is not None:
            add_cluster(centre, rng.uniform(0.1, 0.3) * dd, _count(rng, 3, 12, sparsity), far=True)
    if dme_grade == 1 and not spots:  # guarantee at least one far exudate
        for _ in range(50):
            pos = placer.sample(0.01 * g.size, fovea_clearance_dd=1.3, avoid_vessels=False)
            if pos is not None:
                spots.append(spot(pos[0], pos[1], 0.008 * g.size))
                break
    avoid.extend((s.x, s.y, s.radius) for s in spots)
    return spots


def _plan_beading(
    geom: _Geometry, vessels: Sequence[_Vessel], rng: np.random.Generator
) -> list[_Lesion]:
    """Venous beading (periodic dilatations) on two or three main veins."""
    dd = geom.disc_diameter
    trunks = [v for v in vessels if v.vein and v.depth == 0 and len(v.points) > 8]
    count = int(rng.integers(2, 4))
    lesions: list[_Lesion] = []
    for idx in rng.permutation(len(trunks)):
        if len(lesions) == count:
            break
        v = trunks[int(idx)]
        seg = np.hypot(*np.diff(v.points, axis=0).T)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        start = rng.uniform(0.6, 1.5) * dd
        stop = min(start + rng.uniform(1.5, 2.5) * dd, arc[-1])
        width = float(np.interp(start, arc, v.widths))
        spacing = rng.uniform(2.2, 3.0) * max(width, 1.5)
        at = np.arange(start, stop, spacing)
        xs = np.interp(at, arc, v.points[:, 0])
        ys = np.interp(at, arc, v.points[:, 1])
        radii = np.interp(at, arc, v.widths) * rng.uniform(0.85, 1.05)
        beads = [
            (float(x), float(y), float(r))
            for x, y, r in zip(xs, ys, radii, strict=True)
            if geom.visible(x, y)
        ]
        if len(beads) >= 3:
            mid = beads[len(beads) // 2]
            lesions.append(_Lesion("venous_beading", mid[0], mid[1], mid[2], {"beads": beads}))
    return lesions


def _plan_neovascularisation(
    placer: _Placer,
    vessels: Sequence[_Vessel],
    rng: np.random.Generator,
    avoid: list,
    at_disc: bool | None = None,
) -> _Lesion | None:
    """A tangle of fine tortuous new vessels on a faint fibrous veil, at the disc or elsewhere.

    Args:
        at_disc: Force NVD (True) or NVE (False); None picks at random. NVD always succeeds.
    """
    g = placer.geom
    dd = g.disc_diameter
    extent = rng.uniform(0.4, 0.65) * dd
    if at_disc is None:
        at_disc = bool(rng.random() < 0.5)
    if at_disc:  # NVD: on or next to the disc
        a = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(0.0, 0.5) * dd
        centre: tuple[float, float] | None = (
            g.disc[0] + d * math.cos(a),
            g.disc[1] + d * math.sin(a),
        )
        where = "disc"
    else:  # NVE: along a main vessel, a few DD from the disc
        trunks = [v for v in vessels if v.depth <= 1 and len(v.points) > 10]
        centre = None
        for _ in range(50):
            v = trunks[int(rng.integers(len(trunks)))]
            x, y = v.points[int(rng.integers(len(v.points)))]
            if (
                g.visible(x, y, margin=extent)
                and g.dist_dd(x, y, g.disc) > 1.5
                and g.dist_dd(x, y, g.fovea) > 1.3 + extent / dd
                and all(math.hypot(x - ax, y - ay) > ar + extent for ax, ay, ar in avoid)
            ):
                centre = (float(x), float(y))
                break
        where = "elsewhere"
    if centre is None:
        return None
    loops = []
    step = extent * 0.12
    for _ in range(int(rng.integers(8, 15))):
        a = rng.uniform(0, 2 * math.pi)
        d = extent * math.sqrt(rng.random()) * 0.8
        x, y = centre[0] + d * math.cos(a), centre[1] + d * math.sin(a)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(int(rng.integers(12, 30))):
            heading += rng.normal(0.0, 0.7)
            if math.hypot(x - centre[0], y - centre[1]) > extent:  # turn back into the tangle
                heading = math.atan2(centre[1] - y, centre[0] - x) + rng.normal(0.0, 0.5)
            x += step * math.cos(heading)
            y += step * math.sin(heading)
            pts.append((x, y))
        loops.append(pts)
    avoid.append((centre[0], centre[1], extent))
    return _Lesion(
        "neovascularisation",
        centre[0],
        centre[1],
        extent,
        {"where": where, "loops": loops, "veil": rng.uniform(0.15, 0.3)},
    )


def _plan_preretinal(placer: _Placer, rng: np.random.Generator, avoid: list) -> _Lesion | None:
    """A boat-shaped pre-retinal haemorrhage: round below, flat fluid level on top."""
    g = placer.geom
    dd = g.disc_diameter
    half_w = rng.uniform(0.45, 0.8) * dd
    half_h = half_w * rng.uniform(0.6, 0.85)
    pos = placer.sample(
        half_w,
        disc_clearance_dd=0.3,
        fovea_clearance_dd=0.5,
        avoid_vessels=False,
        avoid=avoid,
        near=(g.fovea, 1.5 * dd, 5.0 * dd),
    )
    if pos is None:
        return None
    avoid.append((pos[0], pos[1], half_w))
    return _Lesion(
        "preretinal_haemorrhage",
        pos[0],
        pos[1],
        half_w,
        {
            "half_height": half_h,
            "level": rng.uniform(0.1, 0.45),
            "tilt": rng.normal(0, 0.05),
            "seed": int(rng.integers(2**31)),
        },
    )


def _plan_lesions(
    dr_grade: int,
    dme_grade: int,
    geom: _Geometry,
    vessels: Sequence[_Vessel],
    rng: np.random.Generator,
    difficulty: Difficulty | None = None,
) -> list[_Lesion]:
    """Every lesion to draw for the grades; the labels follow from this list alone.

    Hard exudates are planned first and the large lesions keep clear of them, so nothing
    hides the exudates that decide the DME grade. ``difficulty`` shrinks the lesion counts
    towards each grade's minimum and the small lesions' radii (`Difficulty`).
    """
    _check_grades(dr_grade, dme_grade)
    if dr_grade == 0:
        return []
    difficulty = difficulty or Difficulty()
    lesions = _plan_lesions_at(dr_grade, dme_grade, geom, vessels, rng, difficulty.sparsity)
    if difficulty.lesion_scale != 1.0:
        lesions = [_scaled(les, difficulty.lesion_scale) for les in lesions]
    return lesions


_SCALABLE = ("microaneurysm", "haemorrhage", "hard_exudate", "cotton_wool_spot")


def _scaled(les: _Lesion, scale: float) -> _Lesion:
    """A small lesion drawn ``scale`` times its planned size, at the same centre.

    Shrinking keeps every rule: centres do not move, and a smaller exudate's edge only moves
    away from the fovea (DME 1 stays beyond 1 DD; DME 2 is decided by a centre within 0.85 DD).
    """
    if les.kind not in _SCALABLE:
        return les
    params = dict(les.params)
    if "parts" in params:
        params["parts"] = [
            (px * scale, py * scale, a * scale, b * scale, ang)
            for px, py, a, b, ang in params["parts"]
        ]
    return _Lesion(les.kind, les.x, les.y, les.radius * scale, params)


def _plan_lesions_at(
    dr_grade: int,
    dme_grade: int,
    geom: _Geometry,
    vessels: Sequence[_Vessel],
    rng: np.random.Generator,
    sparsity: float,
) -> list[_Lesion]:
    """`_plan_lesions` at planned size; ``sparsity`` pulls the counts towards the minimum."""
    placer = _Placer(geom, vessels, rng)
    lesions: list[_Lesion] = []
    avoid: list[tuple[float, float, float]] = []
    if dme_grade > 0:
        lesions += _plan_exudates(placer, rng, dme_grade, avoid, sparsity)
    if dr_grade == 4:
        kinds = [("nv",), ("prh",), ("nv", "prh")][int(rng.choice(3, p=[0.45, 0.2, 0.35]))]
        proliferative: list[_Lesion] = []
        if "nv" in kinds:
            proliferative += _place(
                int(rng.integers(1, 3)),
                lambda: _plan_neovascularisation(placer, vessels, rng, avoid),
            )
        if "prh" in kinds:
            proliferative += _place(
                int(rng.integers(1, 3)), lambda: _plan_preretinal(placer, rng, avoid)
            )
        if not proliferative:  # DR 4 must show a proliferative sign; NVD always fits
            proliferative += _place(
                1, lambda: _plan_neovascularisation(placer, vessels, rng, avoid, at_disc=True)
            )
        lesions += proliferative
    if dr_grade >= 3:
        lesions += _plan_beading(geom, vessels, rng)
        for quadrant in range(4):  # 4-2-1 rule: many haemorrhages in all four quadrants
            n = _count(rng, 5, 9, sparsity)
            lesions += _place(n, lambda q=quadrant: _haemorrhage(placer, rng, q, avoid))
    elif dr_grade == 2:  # a few: never enough for the 4-2-1 rule
        n = _count(rng, 3, 9, sparsity)
        lesions += _place(n, lambda: _haemorrhage(placer, rng, None, avoid))
    if dr_grade >= 2 and rng.random() < (0.4 if dr_grade == 2 else 0.6):
        for _ in range(int(rng.integers(1, 4 if dr_grade == 2 else 6))):
            r = rng.uniform(0.02, 0.035) * geom.size
            pos = placer.sample(
                r,
                fovea_clearance_dd=1.2,
                avoid_vessels=False,
                avoid=avoid,
                near=(geom.disc, 0.8 * geom.disc_diameter, 4.0 * geom.disc_diameter),
            )
            if pos is not None:
                lesions.append(
                    _Lesion(
                        "cotton_wool_spot",
                        pos[0],
                        pos[1],
                        r,
                        {
                            "aspect": rng.uniform(0.6, 0.9),
                            "angle": rng.uniform(0, math.pi),
                            "seed": int(rng.integers(2**31)),
                        },
                    )
                )
    n_ma = {1: (2, 7), 2: (3, 11), 3: (8, 21), 4: (8, 21)}[dr_grade]

    def microaneurysm() -> _Lesion | None:
        r = rng.uniform(0.005, 0.007) * geom.size
        pos = placer.sample(r, near=(geom.fovea, 0.0, 4.0 * geom.disc_diameter), avoid=avoid)
        pos = pos or placer.sample(r, avoid=avoid)
        return None if pos is None else _Lesion("microaneurysm", pos[0], pos[1], r)

    lesions += _place(_count(rng, *n_ma, sparsity), microaneurysm)
    return lesions


def _place(count: int, make: Callable[[], _Lesion | None]) -> list[_Lesion]:
    """Up to ``count`` lesions from ``make`` (which returns None when it finds no room).

    Attempts are bounded; in practice placement only fails in pathological geometries.
    """
    out: list[_Lesion] = []
    for _ in range(20 * count):
        if len(out) == count:
            break
        lesion = make()
        if lesion is not None:
            out.append(lesion)
    return out
