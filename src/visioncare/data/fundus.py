"""Find the fundus field in a photograph and crop to it.

The field model is what cameras export: a circle (the camera's aperture) intersected with an
axis-aligned rectangle (straight cuts on any of the four sides; the frame itself is one), whose
corners may be rounded. The circle may be far larger than the frame (wide-field exports, where
only the rounded rectangle is visible). Exports add grey or coloured frames, rulers, bars, logos
and burned-in text; a bounding box of "bright" pixels takes those for fundus, so the field is
found as a shape instead:

1. On a copy scaled to `WORK_SIDE` px, each pixel is scored by its redness (R − B): retina is
   red, orange or (atrophic) yellow-white at any exposure, while grey, black or blue
   backgrounds, white bars and text are not. Photos without colour (red-free, grayscale) are
   scored by brightness. The threshold is learned from the photo itself: the background's level
   and noise (the darkest pixels' statistics), and a fraction of the field's own level, so a dim
   photo and a pale, diseased retina both stay foreground.
2. An opening removes thin strokes (text, rulers); components that are long, straight and
   rectangle-filling (bars) are dropped by shape; the largest component left, holes filled
   (lesions, atrophy, the disc), is the field.
3. Its bounding box gives the four cuts. A circle is fitted by RANSAC to the outline points that
   are not on those straight edges (arcs of the aperture), then refined by least squares.
   A rounded rectangle (corner radius from the area missing in each corner) is the other model;
   the one whose mask agrees better with the component wins. A field without an arc (a circle
   larger than the frame's diagonal) gets the smallest circle through its corners.
4. The result must look like a field: its model covers the component, it stands out from what
   is outside it, it ends in a step (an aperture's edge, not a defocused glow), and a field
   with no arc must be reddish (a person would not call a grey rectangle a fundus).

`crop_to_field` centres the *visible* field (circle ∩ rectangle) in a square whose side is the
visible field's longer extent and blacks out everything outside the field. `LOCALISATION_VERSION`
is part of every cache key and export, so changing this algorithm invalidates old caches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

_log = logging.getLogger(__name__)

LOCALISATION_VERSION = "circle-rect-2"
WORK_SIDE = 512  # px, long side of the copy the field is located on
MIN_RADIUS = 0.03  # of the working copy's long side: anything smaller is a logo, not a field
MIN_FIELD_SIDE = 0.06  # of the long side: the visible field's smaller extent
REFINE_BELOW = 0.25  # visible extent share of the long side under which we re-locate on a crop
MAX_RADIUS = 3.0  # of the long side: wide-field circles are up to 2x the frame
CUT_MARGIN = 0.02  # of the radius: a field edge further inside the circle than this is a cut
EDGE_BAND = 2.0  # px on the working copy: outline points this close to a cut are not arc points
RANSAC_ITERATIONS = 400
INLIER_TOLERANCE = 1.5  # px on the working copy
MIN_INLIER_SHARE = 0.35  # of the arc points that must lie on the circle
MIN_ARC_POINTS = 24  # fewer arc points than this: no circle, the rectangle model only
MIN_AGREEMENT = 0.9  # IoU between the model's mask and the foreground component
MAX_SURROUND = 0.4  # median score outside the field, relative to inside: a field stands out
CHROMA_FLOOR = 12  # 99th-percentile R − B below this: a colourless photo, score by brightness
NOISE_SIGMAS = 4.0  # a foreground pixel is this many background noise s.d. above it
BACKGROUND_SHARE = 0.15  # of the way from the darkest pixels to the field: still background
FIELD_SHARE = 0.1  # ... and at least this share of the way from background to the field level
MIN_CONTRAST = 6  # score units: the field must exceed the background by at least this
BAR_ASPECT = 4.0  # a component this much longer than wide ...
BAR_FILL = 0.8  # ... filling this share of its rotated rectangle is a bar or ruler
EDGE_STEP = 0.2  # of the field's contrast: the least step across its edge
RECT_MIN_REDNESS = 20  # median R − B a field without any arc must have


@dataclass(frozen=True)
class FundusField:
    """The fundus field in a photo's pixel coordinates: circle ∩ (rounded) rectangle.

    Attributes:
        center_x, center_y, radius: the field's circle (may extend beyond the frame).
        top, bottom: rows where the field is cut flat (or clipped by the frame); equal to
            ``center_y ∓ radius`` when the circle is whole there.
        left, right: columns of the vertical cuts, likewise ``center_x ∓ radius`` when uncut
            (infinite when a caller builds a field without side cuts).
        corner_radius: radius of the rectangle's rounded corners (0: square corners).
    """

    center_x: float
    center_y: float
    radius: float
    top: float
    bottom: float
    left: float = -math.inf
    right: float = math.inf
    corner_radius: float = 0.0

    def scaled(self, factor: float) -> FundusField:
        """The same field in a photo ``factor`` times larger (e.g. reduced JPEG decoding)."""
        return FundusField(*(value * factor for value in asdict(self).values()))

    def shifted(self, dx: float, dy: float) -> FundusField:
        """The same field in a photo whose origin is (-dx, -dy) from this one's (a crop)."""
        return FundusField(
            self.center_x + dx,
            self.center_y + dy,
            self.radius,
            self.top + dy,
            self.bottom + dy,
            self.left + dx,
            self.right + dx,
            self.corner_radius,
        )

    def visible_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the bounding box of the visible field (circle ∩ rectangle)."""
        return (
            max(self.left, self.center_x - self.radius),
            max(self.top, self.center_y - self.radius),
            min(self.right, self.center_x + self.radius),
            min(self.bottom, self.center_y + self.radius),
        )

    def as_dict(self) -> dict[str, float]:
        """Rounded values for CSV/JSON; the visible box replaces infinite cuts."""
        x0, _, x1, _ = self.visible_box()
        values = {**asdict(self), "left": max(self.left, x0), "right": min(self.right, x1)}
        return {key: round(value, 2) for key, value in values.items()}


def _score(small: np.ndarray) -> np.ndarray:
    """Per-pixel fundus score: redness, or brightness for colourless photos (uint8)."""
    red, blue = small[..., 0].astype(np.int16), small[..., 2].astype(np.int16)
    chroma = np.clip(red - blue, 0, 255).astype(np.uint8)
    if np.percentile(chroma, 99) < CHROMA_FLOOR:
        chroma = small.max(axis=2)
    return cv2.GaussianBlur(chroma, (5, 5), 0)


def _threshold(score: np.ndarray) -> float | None:
    """The foreground threshold learned from this photo's own background and field levels.

    The field's level is the median of everything clearly above the darkest pixels, whatever
    the field's share of the frame (a tiny field, or a wide-field one with only its corners
    dark). The background is what lies within `BACKGROUND_SHARE` of the way to it (so a pale
    patch of retina never counts as background): its median and robust noise set
    the threshold, at least `FIELD_SHARE` of the way to the field (pale retina stays in) and
    at most halfway (heavy noise cannot push the field out). None: no contrast worth a field.
    """
    values = score.ravel().astype(np.float32)
    low = float(np.percentile(values, 0.5))
    bright = values[values > low + MIN_CONTRAST]
    if bright.size == 0:
        return None
    level = float(np.median(bright))
    background = values[values < low + max(MIN_CONTRAST, BACKGROUND_SHARE * (level - low))]
    base = float(np.median(background))
    noise = 1.4826 * float(np.median(np.abs(background - base)))
    gap = level - base
    if gap < MIN_CONTRAST:
        return None
    margin = max(NOISE_SIGMAS * noise, FIELD_SHARE * gap, MIN_CONTRAST / 2)
    return base + min(margin, gap / 2)


def _is_bar(stats: np.ndarray, labels: np.ndarray, index: int) -> bool:
    """A long, straight, solid component: a ruler, a UI bar, a line of text."""
    points = cv2.findNonZero((labels == index).astype(np.uint8))
    (_, _), (w, h), _ = cv2.minAreaRect(points)
    long, short = max(w, h), max(min(w, h), 1.0)
    return long / short >= BAR_ASPECT and stats[index, cv2.CC_STAT_AREA] >= BAR_FILL * long * short


def _field_component(score: np.ndarray) -> np.ndarray | None:
    """The field's foreground component, holes filled (uint8 0/1), or None if there is none."""
    threshold = _threshold(score)
    if threshold is None:
        return None
    mask = (score > threshold).astype(np.uint8)
    side = max(3, round(max(score.shape[:2]) / 64) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA])
    # Bars are judged among the big components only: small ones can never win anyway.
    chosen = next((int(i) for i in order[:4] if not _is_bar(stats, labels, int(i))), None)
    if chosen is None:
        return None
    mask = (labels == chosen).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def _circle_through(points: np.ndarray) -> np.ndarray:
    """Circles (cx, cy, r) through point triples (N, 3, 2); degenerate triples give r = inf."""
    a, b, c = points[:, 0], points[:, 1], points[:, 2]
    d = 2 * (a[:, 0] * (b[:, 1] - c[:, 1]) + b[:, 0] * (c[:, 1] - a[:, 1]))
    d += 2 * c[:, 0] * (a[:, 1] - b[:, 1])
    sa, sb, sc = (a**2).sum(1), (b**2).sum(1), (c**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = (sa * (b[:, 1] - c[:, 1]) + sb * (c[:, 1] - a[:, 1]) + sc * (a[:, 1] - b[:, 1])) / d
        uy = (sa * (c[:, 0] - b[:, 0]) + sb * (a[:, 0] - c[:, 0]) + sc * (b[:, 0] - a[:, 0])) / d
        radius = np.hypot(a[:, 0] - ux, a[:, 1] - uy)
    radius[~np.isfinite(radius)] = np.inf
    return np.stack([ux, uy, radius], axis=1)


def _least_squares_circle(points: np.ndarray) -> np.ndarray:
    """Algebraic (Kåsa) circle fit: exact for points on a circle, cheap, no iterations."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x**2 + y**2, rcond=None)
    cx, cy = a / 2, b / 2
    return np.array([cx, cy, np.sqrt(max(c + cx**2 + cy**2, 0.0))])


def _fit_circle(outline: np.ndarray, long_side: int) -> tuple[np.ndarray, float] | None:
    """RANSAC circle on outline points; returns (cx, cy, r) and the inlier share, or None."""
    if len(outline) < MIN_ARC_POINTS:
        return None
    rng = np.random.default_rng(0)  # deterministic: the same photo always gives the same crop
    triples = outline[rng.integers(0, len(outline), size=(RANSAC_ITERATIONS, 3))]
    circles = _circle_through(triples)
    plausible = (circles[:, 2] > MIN_RADIUS * long_side) & (circles[:, 2] < MAX_RADIUS * long_side)
    circles = circles[plausible]
    if len(circles) == 0:
        return None
    dx = outline[None, :, 0] - circles[:, None, 0]
    dy = outline[None, :, 1] - circles[:, None, 1]
    distances = np.abs(np.hypot(dx, dy) - circles[:, None, 2])
    best = circles[int(np.argmax((distances < INLIER_TOLERANCE).sum(axis=1)))]
    for _ in range(3):  # refine on the inliers of the current estimate
        residual = np.abs(np.hypot(*(outline - best[:2]).T) - best[2])
        inliers = outline[residual < 2 * INLIER_TOLERANCE]
        if len(inliers) < 12:
            return None
        best = _least_squares_circle(inliers)
    residual = np.abs(np.hypot(*(outline - best[:2]).T) - best[2])
    return best, float((residual < 2 * INLIER_TOLERANCE).mean())


def _corner_radius(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Rounded-corner radius from the area missing in the box's corners: c²(1 − π/4) each."""
    x0, y0, x1, y1 = box
    inner = mask[y0:y1, x0:x1]
    h, w = inner.shape
    k = max(1, min(h, w) // 2)
    corners = [inner[:k, :k], inner[:k, -k:], inner[-k:, :k], inner[-k:, -k:]]
    missing = float(np.median([k * k - int(c.sum()) for c in corners]))
    return float(np.sqrt(max(missing, 0.0) / (1 - np.pi / 4)))


def _circle_field(circle: np.ndarray, box: tuple[int, int, int, int]) -> FundusField:
    """circle ∩ box, with a side whose edge lies (nearly) on the circle left uncut."""
    cx, cy, radius = (float(v) for v in circle)
    x0, y0, x1, y1 = box
    margin = CUT_MARGIN * radius
    left = cx - radius if x0 - (cx - radius) < margin else float(x0)
    right = cx + radius if (cx + radius) - x1 < margin else float(x1)
    top = cy - radius if y0 - (cy - radius) < margin else float(y0)
    bottom = cy + radius if (cy + radius) - y1 < margin else float(y1)
    return FundusField(cx, cy, radius, top, bottom, left, right)


def _rectangle_field(box: tuple[int, int, int, int], corner: float) -> FundusField:
    """A rounded rectangle; its circle is the smallest centred one through the corner arcs."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    corner = min(corner, half_w, half_h)
    radius = math.hypot(half_w - corner, half_h - corner) + corner
    return FundusField((x0 + x1) / 2, (y0 + y1) / 2, radius, y0, y1, x0, x1, corner)


def _agreement(mask: np.ndarray, field: FundusField) -> float:
    model = field_mask(mask.shape, field)
    union = int((model | mask).sum())
    return int((model & mask).sum()) / union if union else 0.0


def locate_fundus(image: np.ndarray) -> FundusField | None:
    """The fundus field of an RGB uint8 photo, or None when no plausible field is found.

    A field small in a large frame is located again on a crop around it, so its outline gets
    the working copy's full resolution.
    """
    field = _locate(image)
    if field is None:
        return None
    x0, y0, x1, y1 = field.visible_box()
    if max(x1 - x0, y1 - y0) >= 2 * REFINE_BELOW * max(image.shape[:2]):
        return field
    height, width = image.shape[:2]
    margin = 0.625 * max(x1 - x0, y1 - y0)
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    cx0, cy0 = max(0, int(mx - margin)), max(0, int(my - margin))
    cx1, cy1 = min(width, int(mx + margin) + 1), min(height, int(my + margin) + 1)
    refined = _locate(image[cy0:cy1, cx0:cx1])
    return field if refined is None else refined.shifted(cx0, cy0)


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``image`` averaged down to `WORK_SIDE` px on its long side, and that scale factor.

    Area averaging (not sampling) keeps noise and thin structures from aliasing. OpenCV's
    area resize is ~4x faster for an exact integer factor, so a full-size photo is first reduced
    by the largest whole factor (dropping under that many edge pixels), then to size.
    """
    height, width = image.shape[:2]
    factor = max(1, max(height, width) // WORK_SIDE)
    if factor > 1:
        height, width = height // factor, width // factor
        trimmed = image[: height * factor, : width * factor]
        image = cv2.resize(trimmed, (width, height), interpolation=cv2.INTER_AREA)
    scale = WORK_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale != 1 else image
    return small, scale / factor


def _locate(image: np.ndarray) -> FundusField | None:
    """One localisation pass on a working copy of ``image`` (see the module docstring)."""
    small, scale = _working_copy(image)
    score = _score(small)
    mask = _field_component(score)
    if mask is None:
        return _reject("no foreground stands out from the background")
    h, w = mask.shape
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
    if min(box[2] - box[0], box[3] - box[1]) < MIN_FIELD_SIDE * max(h, w):
        return _reject(f"foreground too small: box {box}")
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    # Outline pixels are the component's own pixels: its right/bottom edge sits at x1-1, y1-1.
    on_edge = (
        (outline[:, 0] <= box[0] + EDGE_BAND) | (outline[:, 1] <= box[1] + EDGE_BAND)
        | (outline[:, 0] >= box[2] - 1 - EDGE_BAND) | (outline[:, 1] >= box[3] - 1 - EDGE_BAND)
    )  # fmt: skip
    arcs = outline[~on_edge] + 0.5  # pixel centres
    candidates: list[tuple[float, FundusField, bool]] = []
    fit = _fit_circle(arcs, max(h, w))
    if fit is not None and fit[1] >= MIN_INLIER_SHARE:
        circle_field = _circle_field(fit[0], box)
        candidates.append((_agreement(mask, circle_field), circle_field, True))
    rect_field = _rectangle_field(box, _corner_radius(mask, box))
    # The circle is preferred on a near tie: it is the camera's own geometry.
    candidates.append((_agreement(mask, rect_field) - 0.01, rect_field, False))
    agreement, field, has_arc = max(candidates, key=lambda c: c[0])
    if agreement < MIN_AGREEMENT - (0.01 if not has_arc else 0.0):
        # The component is neither round nor a (rounded) rectangle.
        return _reject(f"shape agrees {agreement:.3f} with the best model {field}")
    inside = field_mask((h, w), field).astype(bool)
    outside = ~inside
    if outside.mean() > 0.01:
        # Medians: a sliver of soft rim outside a wide field must not count as a bright surround.
        if np.median(score[outside]) > MAX_SURROUND * np.median(score[inside]):
            # A patch of texture (noise, a photo of something else), not a field.
            return _reject("the surround is nearly as strong as the field")
        if not _sharp_edge(score, inside):
            return _reject("the field fades out instead of ending at an aperture's edge")
    elif not has_arc:
        # The whole frame is "field" with nothing around it and no arc: not a fundus photo.
        return _reject("the whole frame is foreground and no arc is visible")
    if not has_arc and not _reddish(small, inside):
        # A bright rectangle (a page, a screen) is not a fundus.
        return _reject("a rectangle without an arc that is not reddish")
    return field.scaled(1 / scale)


def _sharp_edge(score: np.ndarray, inside: np.ndarray) -> bool:
    """A camera's aperture ends the field abruptly: just inside its edge the score is still
    well above just outside it, even in a vignetted photo. A soft glow (a blank, defocused
    frame) has no such step. True when there is no outside band to compare (frame edges)."""
    kernel = np.ones((3, 3), np.uint8)
    field = inside.astype(np.uint8)
    band_in = cv2.erode(field, kernel, iterations=2) & ~cv2.erode(field, kernel, iterations=6)
    band_out = cv2.dilate(field, kernel, iterations=6) & ~cv2.dilate(field, kernel, iterations=2)
    band_in, band_out = band_in.astype(bool), band_out.astype(bool)
    if band_in.sum() < 20 or band_out.sum() < 20:
        return True
    step = float(np.median(score[band_in])) - float(np.median(score[band_out]))
    level = float(np.median(score[inside])) - float(np.median(score[~inside]))
    return step >= EDGE_STEP * level


def _reject(reason: str) -> None:
    """Log why a photo has no field (``logging`` DEBUG on this module) and return None."""
    _log.debug("no fundus field: %s", reason)
    return None


def _reddish(small: np.ndarray, inside: np.ndarray) -> bool:
    """The field's median redness (R − B) is that of a retina, however pale or dim."""
    red, blue = small[..., 0][inside].astype(np.int16), small[..., 2][inside].astype(np.int16)
    return float(np.median(red - blue)) >= RECT_MIN_REDNESS


def field_mask(shape: tuple[int, int], field: FundusField) -> np.ndarray:
    """uint8 0/1 mask (H, W) of the field: inside the circle, the cuts and rounded corners."""
    height, width = shape
    ys, xs = np.ogrid[:height, :width]
    # Pixel centres at +0.5: a pixel belongs to the field if its centre does.
    px, py = xs + 0.5, ys + 0.5
    inside = (px - field.center_x) ** 2 + (py - field.center_y) ** 2 <= field.radius**2
    inside &= (py >= field.top) & (py <= field.bottom) & (px >= field.left) & (px <= field.right)
    corner = field.corner_radius
    if corner > 0:
        # Distance from the rectangle shrunk by the corner radius must not exceed that radius.
        dx = np.maximum(np.maximum(field.left + corner - px, px - (field.right - corner)), 0)
        dy = np.maximum(np.maximum(field.top + corner - py, py - (field.bottom - corner)), 0)
        inside &= dx**2 + dy**2 <= corner**2
    return inside.astype(np.uint8)


def crop_window(field: FundusField) -> tuple[float, float, float]:
    """(x0, y0, side): the square `crop_to_field` takes, in the photo's pixels.

    Centred on the visible field's box, with the box's longer extent as its side, so the field
    fills the square along that axis whatever the circle does beyond the frame.
    """
    x0, y0, x1, y1 = field.visible_box()
    side = max(x1 - x0, y1 - y0)
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def crop_to_field(image: np.ndarray, field: FundusField, size: int) -> np.ndarray:
    """The square around the visible field, resized to ``size``, outside the field black.

    Parts of the square beyond the photo are padded black, so a clipped or cut field keeps its
    true shape; bars, text and frames outside the field never reach the network.
    """
    height, width = image.shape[:2]
    left, top, side = crop_window(field)
    x0, y0 = int(np.floor(left)), int(np.floor(top))
    x1, y1 = int(np.ceil(left + side)), int(np.ceil(top + side))
    pad = [max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width)]
    window = image[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)]
    window = cv2.copyMakeBorder(window, *pad, cv2.BORDER_CONSTANT, value=0)
    interpolation = cv2.INTER_AREA if window.shape[0] > size else cv2.INTER_CUBIC
    square = cv2.resize(window, (size, size), interpolation=interpolation)
    return square * field_mask((size, size), field_in_crop(field, size))[..., None]


def field_in_crop(field: FundusField, size: int) -> FundusField:
    """The field in the pixels of its `crop_to_field` square of side ``size``."""
    left, top, side = crop_window(field)
    return field.shifted(-left, -top).scaled(size / side)


def pad_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """The whole photo, centred on a black square and resized: the no-crop fallback."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = cv2.copyMakeBorder(
        image, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
    )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interpolation)
