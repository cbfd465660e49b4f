"""Pixels: one planned scene (retina, disc, macula, vessels, lesions, camera) as an RGB image.

Grade must not leak through global cues: `_render_scene` splits each image's generator into
independent streams (anatomy, appearance, lesions, camera noise), so the same seed rendered at
two grades gives the same eye, colours, illumination and noise and differs only where lesions
are drawn. Everything that decides a label was planned before (`lesions`); this module only
paints it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from visioncare.data.synthetic.anatomy import (
    _Geometry,
    _grow_vessel_tree,
    _sample_geometry,
    _Vessel,
)
from visioncare.data.synthetic.difficulty import Difficulty
from visioncare.data.synthetic.grades import _check_grades
from visioncare.data.synthetic.lesions import _Lesion, _plan_lesions

_MIN_IMAGE_SIZE = 64


def _window(
    size: int, x: float, y: float, extent: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """ROI around (x, y) plus coordinate offsets, so lesions cost only their own pixels."""
    x0, x1 = max(int(x - extent) - 1, 0), min(int(x + extent) + 2, size)
    y0, y1 = max(int(y - extent) - 1, 0), min(int(y + extent) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(x)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _ellipse_alpha(
    dx: np.ndarray, dy: np.ndarray, a: float, b: float, angle: float, soft: float = 1.0
) -> np.ndarray:
    """Anti-aliased filled ellipse; ``soft`` is the edge width in pixels."""
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    d = np.sqrt(u * u + v * v)
    return np.clip((1.0 - d) * (min(a, b) / soft) + 0.5, 0.0, 1.0)


def _blend(img: np.ndarray, sl: tuple[slice, slice], alpha: np.ndarray, colour: Any) -> None:
    """Alpha-composite ``colour`` over ``img[sl]`` in place."""
    patch = img[sl]
    patch += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - patch)


def _polyline_mask(
    shape: tuple[int, int], polylines: Sequence[tuple[np.ndarray, int, int]]
) -> np.ndarray:
    """uint8 mask of anti-aliased polylines given as (points, thickness, value)."""
    mask = np.zeros(shape, np.uint8)
    for pts, thickness, value in polylines:
        ipts = np.round(np.asarray(pts) * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [ipts], False, int(value), int(thickness), cv2.LINE_AA, 4)
    return mask


def _vessel_polylines(vessels: Sequence[_Vessel]) -> tuple[list, list]:
    """Split vessels into runs of equal drawn thickness (veins, arteries), thin ones first.

    Sub-pixel vessels are drawn 1 px wide but fainter, in a few intensity steps, so that runs
    stay long (each run is one cv2 call).
    """
    runs: tuple[list, list] = ([], [])
    for v in sorted(vessels, key=lambda v: float(v.widths.mean())):
        w = v.widths
        key = np.maximum(1, np.round(w)).astype(int) * 1000 + np.round(
            8 * np.clip(w, 0.375, 1.0)
        ).astype(int)
        cuts = (np.flatnonzero(np.diff(key)) + 1).tolist()
        for a, b in zip([0, *cuts], [*cuts, len(w)], strict=True):
            stop = min(b + 1, len(w))  # overlap one point so runs join up
            if stop - a >= 2:
                thick, level = divmod(int(key[a]), 1000)
                runs[0 if v.vein else 1].append((v.points[a:stop], thick, 255 * level // 8))
    return runs


def _smooth_noise(rng: np.random.Generator, grid: int, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean smooth random field (bicubic upsampling of a coarse grid), roughly unit std."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    coarse /= max(float(coarse.std()), 1e-6)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _planes(
    plane: np.ndarray, scales: Sequence[float], dst: np.ndarray | None = None
) -> np.ndarray:
    """(S, S) map times a per-channel scale -> (S, S, 3); cv2.merge is the fast way."""
    return cv2.merge([plane * np.float32(k) for k in scales], dst=dst)


def _composite(
    img: np.ndarray, alpha: np.ndarray, colour: Sequence[float], scratch: np.ndarray
) -> None:
    """Full-image alpha composite of a flat colour, in place.

    cv2.blendLinear is much faster than the numpy expression; ``scratch`` (same shape as
    ``img``) avoids fresh multi-megabyte buffers, whose page faults cost as much as the maths.
    """
    scratch.fill(0.0)
    cv2.add(scratch, (*(float(c) for c in colour), 0.0), dst=scratch)
    cv2.blendLinear(img, scratch, 1.0 - alpha, alpha, dst=img)


def _draw_lesion(img: np.ndarray, les: _Lesion, base: np.ndarray, size: int) -> None:
    """Composite one planned lesion (except venous beading, drawn with the veins)."""
    if les.kind == "microaneurysm":
        win = _window(size, les.x, les.y, les.radius + 2)
        if win:
            sl, dx, dy = win
            alpha = 0.95 * _ellipse_alpha(dx, dy, les.radius, les.radius, 0.0, soft=1.0)
            _blend(img, sl, alpha, base * (0.5, 0.13, 0.2))
    elif les.kind == "haemorrhage":
        reach = max(max(abs(px), abs(py)) + max(a, b) for px, py, a, b, _ in les.params["parts"])
        win = _window(size, les.x, les.y, reach + 2)
        if win:
            sl, dx, dy = win
            alpha = np.zeros((dy.shape[0], dx.shape[1]), np.float32)
            for px, py, a, b, ang in les.params["parts"]:
                alpha = np.maximum(alpha, _ellipse_alpha(dx - px, dy - py, a, b, ang, soft=1.5))
            k = les.params["darkness"]
            _blend(img, sl, 0.92 * alpha, base * (0.62 - 0.12 * k, 0.17 - 0.05 * k, 0.24))
    elif les.kind == "hard_exudate":
        win = _window(size, les.x, les.y, les.radius + 2)
        if win:
            sl, dx, dy = win
            alpha = 0.95 * _ellipse_alpha(dx, dy, les.radius, les.radius * 0.85, 0.3, soft=0.8)
            tone = les.params["tone"]
            _blend(img, sl, alpha, np.array((1.0, 0.88, 0.42)) * tone)
    elif les.kind == "cotton_wool_spot":
        p = les.params
        win = _window(size, les.x, les.y, les.radius + 2)
        if win:
            sl, dx, dy = win
            h, w = dy.shape[0], dx.shape[1]
            fluff = _smooth_noise(np.random.default_rng(p["seed"]), 5, (h, w))
            c, s = math.cos(p["angle"]), math.sin(p["angle"])
            u = (dx * c + dy * s) / les.radius
            v = (-dx * s + dy * c) / (les.radius * p["aspect"])
            d = np.sqrt(u * u + v * v) + 0.12 * fluff
            alpha = 0.8 * np.clip(1.0 - d, 0.0, 1.0) ** 0.6
            _blend(img, sl, alpha, (0.96, 0.92, 0.82))
    elif les.kind == "neovascularisation":
        p = les.params
        win = _window(size, les.x, les.y, les.radius * 1.4 + 4)
        if win:
            sl, dx, dy = win
            # Smooth bump with compact support (radius 1.4 R): the veil stays local.
            r2 = (dx * dx + dy * dy) / (1.4 * les.radius) ** 2
            veil = p["veil"] * np.clip(1.0 - r2, 0.0, 1.0) ** 3
            _blend(img, sl, veil, (0.92, 0.85, 0.8))
            y0, x0 = sl[0].start, sl[1].start
            thick = max(1, round(0.0035 * size))
            lines = [(np.asarray(pts) - (x0, y0), thick, 255) for pts in p["loops"]]
            mask = _polyline_mask((dy.shape[0], dx.shape[1]), lines).astype(np.float32) / 255
            _blend(img, sl, 0.9 * mask, base * (0.75, 0.2, 0.3))
    elif les.kind == "preretinal_haemorrhage":
        p = les.params
        a, b = les.radius, p["half_height"]
        win = _window(size, les.x, les.y, max(a, b) * 1.15 + 3)
        if win:
            sl, dx, dy = win
            h, w = dy.shape[0], dx.shape[1]
            wobble = _smooth_noise(np.random.default_rng(p["seed"]), 6, (h, w))
            c, s = math.cos(p["tilt"]), math.sin(p["tilt"])
            u = (dx * c + dy * s) / a
            v = (-dx * s + dy * c) / b
            d = np.sqrt(u * u + v * v) + 0.04 * wobble
            alpha = np.clip((1.0 - d) * b / 2.5 + 0.5, 0.0, 1.0)
            alpha *= np.clip(dy + p["level"] * b + 0.5, 0.0, 1.0)  # flat fluid level on top
            shade = np.clip(0.5 + 0.5 * dy / b, 0.0, 1.0)[..., None]  # blood settles downwards
            colour = base * np.array((0.6, 0.16, 0.2), np.float32) * (1.0 - 0.35 * shade)
            patch = img[sl]
            patch += (0.95 * alpha)[..., None] * (colour - patch)


def _draw(
    geom: _Geometry,
    vessels: Sequence[_Vessel],
    lesions: Sequence[_Lesion],
    app_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    difficulty: Difficulty | None = None,
) -> np.ndarray:
    """Render albedo (retina, disc, vessels, lesions), then illumination and camera effects.

    ``difficulty`` fades the lesions and widens the camera's ranges around their centres.

    All randomness of the global look comes from ``app_rng`` and ``noise_rng``, never from the
    lesion stream, and no global step looks at the pixels (e.g. the contrast pivot is a fixed
    colour, not the image mean), so the global appearance is independent of the grade.
    Written for speed: full-image float32 passes are kept few, local work uses windows.
    """
    size = geom.size
    shape = (size, size)
    dd = geom.disc_diameter
    cx, cy = geom.centre
    f32 = np.float32
    difficulty = difficulty or Difficulty()
    spread = difficulty.camera

    def camera(low: float, high: float, floor: float = 0.0) -> float:
        """A camera setting from [low, high], that range widened by ``spread`` about its middle."""
        if spread == 1.0:
            return float(app_rng.uniform(low, high))
        mid, half = (low + high) / 2, spread * (high - low) / 2
        return max(floor, float(app_rng.uniform(mid - half, mid + half)))

    # Retina albedo: orange-red with choroidal mottling.
    base = np.array(
        [app_rng.uniform(0.78, 0.95), app_rng.uniform(0.3, 0.42), app_rng.uniform(0.1, 0.2)],
        dtype=f32,
    )
    texture = f32(app_rng.uniform(0.03, 0.08)) * _smooth_noise(app_rng, 10, shape)
    texture += f32(app_rng.uniform(0.015, 0.04)) * _smooth_noise(app_rng, 40, shape)
    texture += f32(1.0)
    img = _planes(texture, base)

    # Macula: darker, slightly browner (macular pigment absorbs blue-green).
    fx, fy = geom.fovea
    sigma = app_rng.uniform(0.45, 0.7) * dd
    win = _window(size, fx, fy, 3 * sigma)
    depth = app_rng.uniform(0.3, 0.45)
    reflex = app_rng.random() < 0.6
    if win:
        sl, dx, dy = win
        r2 = dx * dx + dy * dy
        mac = np.exp(-r2 / f32(2 * sigma**2))
        img[sl] *= 1.0 - f32(depth) * mac[..., None] * np.array((0.8, 1.0, 1.1), f32)
        if reflex:
            # Faint and small, so it is not mistaken for a hard exudate at the fovea (DME 2).
            glint = f32(0.15) * np.exp(-r2 / f32(2 * (0.03 * dd) ** 2))
            _blend(img, sl, glint, (1.0, 0.9, 0.8))

    # Optic disc: pale yellow-orange rim, brighter cup, soft margin.
    win = _window(size, geom.disc[0], geom.disc[1], dd * geom.disc_aspect)
    a = dd / 2
    b = a * geom.disc_aspect
    rim_colour = (
        app_rng.uniform(0.95, 1.0),
        app_rng.uniform(0.62, 0.74),
        app_rng.uniform(0.38, 0.5),
    )
    cup = app_rng.uniform(0.3, 0.5)
    cup_offset = -geom.side * app_rng.uniform(0.0, 0.12) * dd
    disc_alpha = None
    if win:
        sl, dx, dy = win
        halo = 0.35 * _ellipse_alpha(dx, dy, a * 1.25, b * 1.2, 0.0, soft=0.2 * dd)
        _blend(img, sl, halo, base * np.array((1.1, 1.3, 1.4), f32))
        disc_alpha = _ellipse_alpha(dx, dy, a, b, 0.0, soft=0.08 * dd)
        _blend(img, sl, disc_alpha, rim_colour)
        cup_alpha = 0.85 * _ellipse_alpha(dx - cup_offset, dy, a * cup, b * cup, 0.0, 0.1 * dd)
        _blend(img, sl, cup_alpha, (1.0, 0.9, 0.75))

    # Vessels (venous beading is drawn into the vein mask so it has the vein's colour).
    scratch = np.empty_like(img)
    vein_runs, artery_runs = _vessel_polylines(vessels)
    vein_mask = _polyline_mask(shape, vein_runs)
    artery_mask = _polyline_mask(shape, artery_runs)
    for les in lesions:
        if les.kind == "venous_beading":
            for bx, by, br in les.params["beads"]:
                centre = (round(bx * 16), round(by * 16))
                cv2.circle(vein_mask, centre, round(br * 16), 255, -1, cv2.LINE_AA, 4)
    sig = max(0.4, 0.0012 * size)
    for mask, colour, opacity in (
        (artery_mask, base * np.array((0.82, 0.42, 0.5), f32), 0.8),
        (vein_mask, base * np.array((0.55, 0.2, 0.38), f32), 0.9),
    ):
        alpha = cv2.GaussianBlur(mask, (0, 0), sig).astype(f32)
        alpha *= f32(opacity / 255)
        if disc_alpha is not None:  # vessels look paler where they cross the disc
            alpha[win[0]] *= 1.0 - 0.35 * disc_alpha
        _composite(img, alpha, colour, scratch)

    # Lesions: large ones first so small lesions stay on top (sorted() is stable).
    order = {"preretinal_haemorrhage": 0, "neovascularisation": 1, "haemorrhage": 2}
    order["hard_exudate"] = 4  # last: the DME sign must never be covered
    clean = img.copy() if difficulty.lesion_opacity < 1.0 and lesions else None
    for les in sorted(lesions, key=lambda les: order.get(les.kind, 3)):
        _draw_lesion(img, les, base, size)
    if clean is not None:  # fainter lesions: blend back towards the lesion-free retina
        cv2.addWeighted(
            img, difficulty.lesion_opacity, clean, 1.0 - difficulty.lesion_opacity, 0.0, dst=img
        )

    # Illumination (vignetting, uneven linear gradient) and field of view, in one (S, S) map.
    xs = (np.arange(size, dtype=f32)[None, :] - f32(cx)) / f32(geom.radius)
    ys = (np.arange(size, dtype=f32)[:, None] - f32(cy)) / f32(geom.radius)
    r = np.sqrt(xs * xs + ys * ys)
    falloff = cv2.pow(np.minimum(r, f32(1.0)), app_rng.uniform(1.8, 3.0))
    vignette = 1.0 - f32(camera(0.2, 0.5)) * falloff
    gx, gy = app_rng.normal(0.0, 0.12 * spread, size=2)
    light = np.clip(vignette * (1.0 + f32(gx) * xs + f32(gy) * ys), 0.2, 1.5)
    exposure = camera(0.85, 1.15, floor=0.3)

    # Camera colour response: channel gains (hue) and contrast around a fixed pivot colour.
    gains = np.array([camera(0.92, 1.08, 0.3), camera(0.85, 1.15, 0.3), camera(0.75, 1.3, 0.3)])
    contrast = camera(0.85, 1.2, floor=0.3)
    pivot = 0.75 * exposure * gains * base
    # Per channel: x * light * gain * exposure * contrast + pivot * (1 - contrast).
    # In place (dst=img) throughout: fresh full-size buffers cost page faults.
    cv2.multiply(img, _planes(light, exposure * gains * contrast, scratch), dst=img)
    cv2.add(img, (*(pivot * (1.0 - contrast)).tolist(), 0.0), dst=img)
    np.clip(img, 0.0, 1.0, out=img)
    cv2.pow(img, camera(0.85, 1.2, floor=0.3), dst=img)
    cv2.GaussianBlur(img, (0, 0), camera(0.3, 0.9) * size / 512 + 0.2, dst=img)
    noise_amp = np.sqrt(3.0) * camera(0.004, 0.018)  # uniform noise with that s.d.
    noise_rng.random(img.shape, dtype=f32, out=scratch)
    cv2.scaleAdd(scratch, 2 * noise_amp, img, dst=img)
    cv2.subtract(img, (noise_amp,) * 3 + (0.0,), dst=img)

    # Field of view: soft circular edge, sometimes cut off at top and bottom.
    edge = max(1.0, 0.006 * size) / geom.radius
    fov = np.clip((1.0 - r) / f32(edge) + f32(0.5), 0.0, 1.0)
    if geom.clip is not None:
        band = (f32(geom.clip / geom.radius) - np.abs(ys)) * f32(geom.radius)  # px inside
        fov *= np.clip(band + f32(0.5), 0.0, 1.0)
    cv2.multiply(img, _planes(fov, (255.0, 255.0, 255.0), scratch), dst=img)
    np.clip(img, 0.0, 255.0, out=img)
    return cv2.convertScaleAbs(img)  # rounds and saturates to uint8


def _render_scene(
    dr_grade: int,
    dme_grade: int,
    image_size: int,
    rng: np.random.Generator,
    difficulty: Difficulty | None = None,
) -> tuple[np.ndarray, _Geometry, list[_Vessel], list[_Lesion]]:
    """Render one image and return it with the scene it was drawn from (for tests)."""
    _check_grades(dr_grade, dme_grade)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    # Independent streams: the grade changes only what the lesion stream draws.
    anatomy_seed, appearance_seed, lesion_seed, noise_seed = (
        int(s) for s in rng.integers(0, 2**63 - 1, size=4, dtype=np.int64)
    )
    anatomy_rng = np.random.default_rng(anatomy_seed)
    geom = _sample_geometry(image_size, anatomy_rng)
    vessels = _grow_vessel_tree(geom, anatomy_rng)
    lesion_rng = np.random.default_rng(lesion_seed)
    lesions = _plan_lesions(dr_grade, dme_grade, geom, vessels, lesion_rng, difficulty)
    image = _draw(
        geom,
        vessels,
        lesions,
        np.random.default_rng(appearance_seed),
        np.random.default_rng(noise_seed),
        difficulty,
    )
    return image, geom, vessels, lesions


def render_fundus(
    dr_grade: int,
    dme_grade: int,
    image_size: int,
    rng: np.random.Generator,
    difficulty: Difficulty | None = None,
) -> np.ndarray:
    """One RGB uint8 image (image_size, image_size, 3).

    Args:
        dr_grade: Diabetic retinopathy grade 0-4 (ICDR).
        dme_grade: Risk of macular edema 0-2 (IDRiD); > 0 needs ``dr_grade >= 2``.
        image_size: Side of the square image in pixels (>= 64).
        rng: Source of all randomness; the same generator state gives the same pixels.
        difficulty: how hard the lesions are to see (`Difficulty`; None = standard).
    """
    return _render_scene(dr_grade, dme_grade, image_size, rng, difficulty)[0]
