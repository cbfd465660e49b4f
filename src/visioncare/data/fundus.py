"""Find the fundus field in a photograph (a circle plus straight top/bottom cuts) and crop to it.

Fundus cameras image a round field; many cut it flat at the top and bottom (IDRiD, HRF), some
clip it at the frame, and exports add grey capture frames, rulers, logos and burned-in text.
A bounding box of "bright" pixels takes all of those for fundus, so the field is found as a
shape instead:

1. On a copy scaled to `WORK_SIDE` px, each pixel is scored by its redness (R − B): the retina
   is red/orange at any exposure, while grey or black backgrounds, white bars and text are not.
   Photos without colour (red-free, grayscale) are scored by brightness instead. Otsu splits the
   scores; an opening removes thin strokes (text, rulers); the largest component, holes filled,
   is the field.
2. A circle is fitted to that component's outline by RANSAC, ignoring outline points on the
   frame's edge (a clipped circle) and leaving straight cuts and notches as outliers, then
   refined by least squares on the inliers.
3. The cuts are where the field's rows stop short of the circle.

`crop_to_field` then centres the circle in a square whose side is its diameter and blacks out
everything outside the field. `LOCALISATION_VERSION` is part of every cache key and export, so
changing this algorithm invalidates caches built with the old one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

LOCALISATION_VERSION = "circle-cuts-1"
WORK_SIDE = 512  # px, long side of the copy the field is located on
MIN_RADIUS = 0.04  # of the working copy's long side: anything smaller is a logo, not a field
REFINE_BELOW = 0.25  # radius share of the long side under which the field is re-located on a crop
MAX_RADIUS = 0.9
CUT_MARGIN = 0.02  # of the radius: a field edge further inside the circle than this is a cut
RANSAC_ITERATIONS = 400
INLIER_TOLERANCE = 1.5  # px on the working copy
MIN_INLIER_SHARE = 0.35  # of the outline off the frame's edge that must lie on the circle
MIN_FILL = 0.85  # of the circle (inside frame and cuts) the field component must cover
MAX_SURROUND = 0.4  # mean score outside the field, relative to inside: a field stands out
CHROMA_FLOOR = 12  # 99th-percentile R − B below this: a colourless photo, score by brightness


@dataclass(frozen=True)
class FundusField:
    """The fundus field in a photo's pixel coordinates.

    Attributes:
        center_x, center_y, radius: the field's circle (may extend beyond the frame).
        top, bottom: rows where the field is cut flat (or clipped by the frame); equal to
            ``center_y ∓ radius`` when the circle is whole there.
    """

    center_x: float
    center_y: float
    radius: float
    top: float
    bottom: float

    def scaled(self, factor: float) -> FundusField:
        """The same field in a photo ``factor`` times larger (e.g. reduced JPEG decoding)."""
        return FundusField(*(value * factor for value in asdict(self).values()))

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 2) for key, value in asdict(self).items()}


def _score(small: np.ndarray) -> np.ndarray:
    """Per-pixel fundus score: redness, or brightness for colourless photos (uint8)."""
    red, blue = small[..., 0].astype(np.int16), small[..., 2].astype(np.int16)
    chroma = np.clip(red - blue, 0, 255).astype(np.uint8)
    if np.percentile(chroma, 99) < CHROMA_FLOOR:
        chroma = small.max(axis=2)
    return cv2.GaussianBlur(chroma, (5, 5), 0)


def _field_mask(score: np.ndarray) -> np.ndarray | None:
    """The largest foreground component, holes filled (uint8 0/1), or None if there is none."""
    if int(score.max()) < CHROMA_FLOOR:
        return None  # black (or colourless and dark) frame: nothing to find
    threshold, _ = cv2.threshold(score, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu on a photo whose border is pure noise can land in that noise: keep a floor.
    mask = (score > max(threshold, CHROMA_FLOOR / 2)).astype(np.uint8)
    side = max(3, round(max(score.shape[:2]) / 64) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == largest).astype(np.uint8)
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
    if len(outline) < 12:
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


def locate_fundus(image: np.ndarray) -> FundusField | None:
    """The fundus field of an RGB uint8 photo, or None when no plausible field is found.

    A field small in a large frame is located again on a crop around it, so its circle gets
    the working copy's full resolution.
    """
    field = _locate(image)
    if field is None or field.radius >= REFINE_BELOW * max(image.shape[:2]):
        return field
    height, width = image.shape[:2]
    margin = 1.25 * field.radius
    x0, y0 = max(0, int(field.center_x - margin)), max(0, int(field.center_y - margin))
    x1 = min(width, int(field.center_x + margin) + 1)
    y1 = min(height, int(field.center_y + margin) + 1)
    refined = _locate(image[y0:y1, x0:x1])
    if refined is None:
        return field
    return FundusField(
        refined.center_x + x0,
        refined.center_y + y0,
        refined.radius,
        refined.top + y0,
        refined.bottom + y0,
    )


def _locate(image: np.ndarray) -> FundusField | None:
    """One localisation pass on a working copy of ``image`` (see the module docstring)."""
    height, width = image.shape[:2]
    scale = WORK_SIDE / max(height, width)
    small = cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))), cv2.INTER_AREA
    )
    score = _score(small)
    mask = _field_mask(score)
    if mask is None:
        return None
    h, w = mask.shape
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    on_frame = (
        (outline[:, 0] <= 1) | (outline[:, 1] <= 1) | (outline[:, 0] >= w - 2)
        | (outline[:, 1] >= h - 2)
    )  # fmt: skip
    fit = _fit_circle(outline[~on_frame], max(h, w))
    if fit is None or fit[1] < MIN_INLIER_SHARE:
        return None
    (cx, cy, radius), _ = fit
    rows = np.flatnonzero(mask.any(axis=1))
    top = max(cy - radius, float(rows[0]))
    bottom = min(cy + radius, float(rows[-1] + 1))
    if top - (cy - radius) < CUT_MARGIN * radius:
        top = cy - radius
    if (cy + radius) - bottom < CUT_MARGIN * radius:
        bottom = cy + radius
    field = FundusField(cx, cy, radius, top, bottom)
    inside = field_mask((h, w), field)
    if not inside.any() or (mask & inside).sum() < MIN_FILL * inside.sum():
        return None  # the outline looked round but the circle is not filled by the field
    outside = inside == 0
    if outside.any() and score[outside].mean() > MAX_SURROUND * score[inside == 1].mean():
        return None  # a round patch of texture (noise, a photo of something else), not a field
    return field.scaled(1 / scale)


def field_mask(shape: tuple[int, int], field: FundusField) -> np.ndarray:
    """uint8 0/1 mask (H, W) of the field: inside the circle and between the cuts."""
    height, width = shape
    ys, xs = np.ogrid[:height, :width]
    # Pixel centres at +0.5: a pixel belongs to the field if its centre does.
    inside = (xs + 0.5 - field.center_x) ** 2 + (ys + 0.5 - field.center_y) ** 2
    mask = (inside <= field.radius**2) & (ys + 0.5 >= field.top) & (ys + 0.5 <= field.bottom)
    return mask.astype(np.uint8)


def crop_to_field(image: np.ndarray, field: FundusField, size: int) -> np.ndarray:
    """The square around the field's circle, resized to ``size``, outside the field black.

    The circle is centred and touches all four sides; parts of the square beyond the photo are
    padded black, so a clipped or cut field keeps its true position and aspect ratio.
    """
    height, width = image.shape[:2]
    left, top = field.center_x - field.radius, field.center_y - field.radius
    side = 2 * field.radius
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
    factor = size / (2 * field.radius)
    half = size / 2
    top = (field.top - field.center_y) * factor + half
    bottom = (field.bottom - field.center_y) * factor + half
    return FundusField(half, half, half, top, bottom)


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
