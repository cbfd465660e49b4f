"""The eye itself: field of view, optic disc, fovea and vessel tree, in pixel coordinates.

Nothing here knows about grades or lesions: the anatomy comes from its own random stream (see
`render._render_scene`), so one seed gives the same eye at every grade. Lesion planning places
lesions relative to this geometry; `render` draws the disc, macula and vessels placed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Geometry:
    """Where things are in one image, in pixels (x = column, y = row)."""

    size: int
    centre: tuple[float, float]
    radius: float  # fundus field radius
    clip: float | None  # half-height of the visible band when top/bottom are cut off
    side: int  # +1: disc right of the fovea in the image (right eye), -1: left eye
    disc: tuple[float, float]
    disc_diameter: float  # DD, the unit of the DME rule (horizontal disc diameter)
    disc_aspect: float  # vertical / horizontal disc diameter
    fovea: tuple[float, float]

    def visible(self, x: float, y: float, margin: float = 0.0) -> bool:
        """True where (x, y) lies inside the visible fundus field, ``margin`` px from its edge."""
        cx, cy = self.centre
        if math.hypot(x - cx, y - cy) > self.radius - margin:
            return False
        return self.clip is None or abs(y - cy) <= self.clip - margin

    def quadrant(self, x: float, y: float) -> int:
        """Quadrant (0-3) around the fovea: lines through the fovea split the field in four."""
        fx, fy = self.fovea
        return int(x >= fx) + 2 * int(y >= fy)

    def dist_dd(self, x: float, y: float, to: tuple[float, float]) -> float:
        """Distance from (x, y) to a point, in optic-disc diameters."""
        return math.hypot(x - to[0], y - to[1]) / self.disc_diameter


@dataclass
class _Vessel:
    """One vessel segment as a polyline with a full width (px) per point."""

    points: np.ndarray  # (N, 2) float
    widths: np.ndarray  # (N,) float
    vein: bool
    depth: int  # 0 for trunks leaving the disc


def _sample_geometry(size: int, rng: np.random.Generator) -> _Geometry:
    """Field circle, eye side, optic disc and fovea of a macula-centred 50-degree photograph."""
    s = float(size)
    radius = rng.uniform(0.42, 0.48) * s
    cx = s / 2 + rng.uniform(-0.02, 0.02) * s
    cy = s / 2 + rng.uniform(-0.02, 0.02) * s
    clip = radius * rng.uniform(0.86, 0.96) if rng.random() < 0.5 else None
    side = 1 if rng.random() < 0.5 else -1
    dd = rng.uniform(0.15, 0.18) * 2 * radius
    disc_to_fovea = rng.uniform(2.3, 2.7) * dd
    # Macula-centred: fovea a little temporal of the centre, the disc nasal but fully inside.
    fovea_offset = max(rng.uniform(0.1, 0.5) * dd, disc_to_fovea - radius + 0.9 * dd)
    fx = cx - side * fovea_offset
    disc_y = cy + rng.uniform(-0.35, 0.1) * dd
    fy = disc_y + rng.uniform(0.0, 0.35) * dd  # the fovea sits slightly below the disc
    disc_dx = math.sqrt(max(disc_to_fovea**2 - (fy - disc_y) ** 2, 0.0))
    return _Geometry(
        size=size,
        centre=(cx, cy),
        radius=radius,
        clip=clip,
        side=side,
        disc=(fx + side * disc_dx, disc_y),
        disc_diameter=dd,
        disc_aspect=rng.uniform(1.0, 1.12),
        fovea=(fx, fy),
    )


def _grow_vessel(
    geom: _Geometry,
    rng: np.random.Generator,
    out: list[_Vessel],
    start: tuple[float, float],
    heading: float,
    width: float,
    length: float,
    vein: bool,
    depth: int,
    curvature: float = 0.0,
    turn: tuple[float, float] | None = None,
) -> None:
    """Grow one tortuous, tapering vessel and recursively its thinner branches.

    Args:
        turn: Optional (curvature, arc length) of an initial bend, used to make the temporal
            arcades sweep around the macula before continuing with ``curvature``.
    """
    dd = geom.disc_diameter
    step = max(1.0, 0.007 * geom.size)
    min_width = max(0.5, 0.001 * geom.size)
    cx, cy = geom.centre
    fx, fy = geom.fovea
    field_r2 = (geom.radius * 1.02) ** 2
    faz_r2 = (0.3 * dd) ** 2  # foveal avascular zone: vessels stop short of the fovea
    taper = math.exp(-step / (7.0 * dd))
    branch_p = step / (rng.uniform(0.6, 1.1) * dd * (0.8**depth))
    n_steps = math.ceil(length / step)
    # Draw the per-step randomness in bulk: the walk below is a hot Python loop.
    kicks = rng.normal(0.0, 0.3 * math.sqrt(step / dd), n_steps).tolist()
    coins = rng.random(n_steps).tolist()
    x, y = start
    points, widths = [(x, y)], [width]
    pending: list[tuple[tuple[float, float], float, float, float]] = []
    for i in range(n_steps):
        travelled = (i + 1) * step
        bend = turn[0] if turn is not None and travelled <= turn[1] else curvature
        heading += bend * step + kicks[i]
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        width *= taper
        if (x - cx) ** 2 + (y - cy) ** 2 > field_r2 or width < min_width:
            break
        if travelled > 0.3 * dd and (x - fx) ** 2 + (y - fy) ** 2 < faz_r2:
            break
        points.append((x, y))
        widths.append(width)
        if depth < 3 and travelled > 0.4 * dd and coins[i] < branch_p:
            child_width = width * rng.uniform(0.5, 0.75)
            child_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
            pending.append(((x, y), child_heading, child_width, travelled))
            width *= rng.uniform(0.85, 0.95)
    if len(points) >= 2:
        out.append(
            _Vessel(np.asarray(points), np.asarray(widths), vein=vein, depth=depth),
        )
    for child_start, child_heading, child_width, at in pending:
        child_length = max(length - at, dd) * rng.uniform(0.35, 0.75)
        _grow_vessel(
            geom,
            rng,
            out,
            child_start,
            child_heading,
            child_width,
            child_length,
            vein,
            depth + 1,
            curvature=rng.normal(0.0, 0.25) / dd,
        )


def _grow_vessel_tree(geom: _Geometry, rng: np.random.Generator) -> list[_Vessel]:
    """Arcade trunks (vein + artery above and below, temporal and nasal) and their branches.

    Returned in growth order; trunk veins come first within each arcade, which the venous
    beading planner relies on (it picks ``depth == 0`` veins).
    """
    dd = geom.disc_diameter
    dx, dy = geom.disc
    side = geom.side
    vessels: list[_Vessel] = []
    for sgn in (-1, 1):  # superior (up, -y) then inferior
        bend_sign = sgn * side  # rotating from vertical towards the temporal side
        for vein in (True, False):
            trunk_width = (rng.uniform(0.075, 0.09) if vein else rng.uniform(0.055, 0.068)) * dd
            start = (dx + rng.normal(0.0, 0.06) * dd, dy + sgn * rng.uniform(0.05, 0.2) * dd)
            heading = sgn * math.pi / 2 + bend_sign * rng.uniform(0.1, 0.35)
            bend_radius = rng.uniform(1.4, 2.0) * dd
            bend_angle = rng.uniform(1.6, 2.0)
            _grow_vessel(
                geom,
                rng,
                vessels,
                start,
                heading,
                trunk_width,
                rng.uniform(5.5, 7.0) * dd,
                vein,
                0,
                curvature=bend_sign * rng.uniform(0.0, 0.12) / dd,
                turn=(bend_sign / bend_radius, bend_radius * bend_angle),
            )
            # nasal trunk
            angle = rng.uniform(0.4, 1.1)
            _grow_vessel(
                geom,
                rng,
                vessels,
                (dx + side * 0.1 * dd, dy + sgn * 0.1 * dd),
                math.atan2(sgn * math.sin(angle), side * math.cos(angle)),
                trunk_width * rng.uniform(0.7, 0.85),
                rng.uniform(2.5, 4.0) * dd,
                vein,
                0,
                curvature=rng.normal(0.0, 0.1) / dd,
            )
    temporal = math.pi if side > 0 else 0.0
    for _ in range(int(rng.integers(2, 4))):  # small papillomacular vessels
        _grow_vessel(
            geom,
            rng,
            vessels,
            (dx - side * 0.3 * dd, dy + rng.normal(0.0, 0.2) * dd),
            temporal + rng.normal(0.0, 0.3),
            rng.uniform(0.025, 0.035) * dd,
            rng.uniform(1.5, 2.2) * dd,
            bool(rng.random() < 0.5),
            2,
        )
    return vessels
