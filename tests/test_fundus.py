"""Fundus localisation on a real photograph perturbed the way real exports are.

The photo is scikit-image's bundled `retina.jpg` (a real fundus photograph, public domain). Its
true circle is measured independently of the code under test — from the area and centroid of the
clean photo's field, which lies whole inside the frame — and every perturbation below moves that
circle by a known amount (or not at all), so the located circle can be checked against truth:
IoU >= 0.95 and centre and radius within 3 % of the radius.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from skimage import data

from visioncare.data.fundus import (
    FundusField,
    crop_to_field,
    crop_window,
    field_mask,
    locate_fundus,
)

Circle = tuple[float, float, float]  # cx, cy, r in pixels


@pytest.fixture(scope="module")
def retina() -> tuple[np.ndarray, Circle]:
    """The photo at half size (fast) and its true circle."""
    image = cv2.resize(data.retina(), (706, 706), interpolation=cv2.INTER_AREA)
    field = image.max(axis=2) > 30
    ys, xs = np.nonzero(field)
    return image, (xs.mean() + 0.5, ys.mean() + 0.5, np.sqrt(field.sum() / np.pi))


def _iou(a: Circle, b: Circle) -> float:
    size = int(2 * max(a[0] + a[2], a[1] + a[2], b[0] + b[2], b[1] + b[2])) + 4
    masks = [
        field_mask((size, size), FundusField(cx + size / 4, cy + size / 4, r, -1e9, 1e9))
        for cx, cy, r in (a, b)
    ]
    return float((masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum())


# Each perturbation takes (image, truth) and returns (perturbed image, its truth).
def white_bar(image, truth):
    cx, _, r = truth
    out = cv2.copyMakeBorder(image, 0, 0, 0, 60, cv2.BORDER_CONSTANT, value=0)
    x = int(cx + r) + 6
    out[:, x : x + 40] = 255  # a ruler/UI bar beside the field, full height
    return out, truth


def white_bar_touching(image, truth):
    out = image.copy()
    cx, _, r = truth
    out[:, int(cx + r) - 30 : int(cx + r) + 20] = 250  # overlaps the field's right edge
    return out, truth


def grey_rectangle(image, truth):
    frame = np.zeros((900, 1100, 3), np.uint8)
    frame[40:860, 60:1040] = 70  # dark grey capture frame
    y, x = 97, 197
    h, w = image.shape[:2]
    region = frame[y : y + h, x : x + w]
    field = image.max(axis=2, keepdims=True) > 15
    frame[y : y + h, x : x + w] = np.where(field, image, region)
    return frame, (truth[0] + x, truth[1] + y, truth[2])


def coloured_background(image, truth):
    out = image.copy()
    background = image.max(axis=2) <= 15
    out[background] = (30, 60, 140)  # a blue viewer background
    return out, truth


def burned_in_text(image, truth):
    out = image.copy()
    for i, text in enumerate(["PATIENT 0042  OD", "2024-05-01 10:31", "TOPCON 45deg"]):
        cv2.putText(out, text, (10, 30 + 28 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255,) * 3, 2)
    cv2.putText(out, "L", (640, 690), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 0), 4)
    cv2.rectangle(out, (600, 10), (690, 60), (255, 255, 255), -1)  # a logo
    return out, truth


def jpeg_noise(image, truth):
    rng = np.random.default_rng(0)
    noisy = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255)
    ok, buffer = cv2.imencode(".jpg", noisy.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 35])
    assert ok
    return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED), truth


def clipped_top_bottom(image, truth):
    cut = 90  # the camera's straight cuts (IDRiD, HRF): the frame is shorter than the circle
    return image[cut:-cut].copy(), (truth[0], truth[1] - cut, truth[2])


def clipped_by_frame(image, truth):
    out = image[40:, 70:].copy()  # circle runs off the top and left of the frame
    return out, (truth[0] - 70, truth[1] - 40, truth[2])


def off_centre(image, truth):
    frame = np.zeros((1000, 1300, 3), np.uint8)
    frame[250:956, 540:1246] = image
    return frame, (truth[0] + 540, truth[1] + 250, truth[2])


def _shrunk_into_frame(image, truth, side, frame_hw, top, left):
    """The 706 px photo resized to ``side`` px and placed at (top, left) in a black frame."""
    frame = np.zeros((*frame_hw, 3), np.uint8)
    frame[top : top + side, left : left + side] = cv2.resize(
        image, (side, side), interpolation=cv2.INTER_AREA
    )
    f = side / 706
    return frame, (truth[0] * f + left, truth[1] * f + top, truth[2] * f)


def small_in_large_frame(image, truth):
    return _shrunk_into_frame(image, truth, 300, (1200, 1600), top=400, left=300)


def tiny_in_huge_frame(image, truth):
    """A 150 px field in a 2000 px frame: found, then re-located on a crop around it."""
    return _shrunk_into_frame(image, truth, 150, (1500, 2000), top=900, left=1500)


def darkened(image, truth):
    return (image.astype(np.float32) * 0.22).astype(np.uint8), truth


def brightened(image, truth):
    return np.clip(image.astype(np.float32) * 1.8, 0, 255).astype(np.uint8), truth


def grayscale(image, truth):
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), truth


def everything(image, truth):
    out, truth = clipped_top_bottom(image, truth)
    out, truth = grey_rectangle(out, truth)
    out, truth = burned_in_text(out, truth)
    out, truth = white_bar(out, truth)
    return jpeg_noise(out, truth)


PERTURBATIONS: list[Callable] = [
    lambda image, truth: (image, truth),
    white_bar,
    white_bar_touching,
    grey_rectangle,
    coloured_background,
    burned_in_text,
    jpeg_noise,
    clipped_top_bottom,
    clipped_by_frame,
    off_centre,
    small_in_large_frame,
    tiny_in_huge_frame,
    darkened,
    brightened,
    grayscale,
    everything,
]


@pytest.mark.parametrize(
    "perturb", PERTURBATIONS, ids=["clean", *(p.__name__ for p in PERTURBATIONS[1:])]
)
def test_located_circle_matches_truth(retina, perturb):
    image, truth = perturb(*retina)
    field = locate_fundus(image)
    assert field is not None, "no fundus found"
    cx, cy, r = truth
    found = (field.center_x, field.center_y, field.radius)
    assert abs(field.radius - r) <= 0.03 * r, (found, truth)
    assert np.hypot(field.center_x - cx, field.center_y - cy) <= 0.03 * r, (found, truth)
    assert _iou(found, truth) >= 0.95


def test_cuts_are_found_and_cropped_black(retina):
    image, _ = clipped_top_bottom(*retina)
    field = locate_fundus(image)
    assert field is not None
    height = image.shape[0]
    assert field.top == pytest.approx(0, abs=3) and field.bottom == pytest.approx(height, abs=3)
    whole = locate_fundus(retina[0])
    assert whole is not None
    assert whole.top == pytest.approx(whole.center_y - whole.radius)  # no cut
    crop = crop_to_field(image, field, 256)
    assert crop.shape == (256, 256, 3)
    # Above the top cut (90 rows of 2r = 706 rows, scaled to 256: ~32 rows) the crop is black.
    assert not crop[:28].any() and crop[40:216, 128].min() > 0
    # The disc is centred: its left and right edges are equally far from the sides.
    row = crop[128].max(axis=1) > 0
    left, right = np.flatnonzero(row)[[0, -1]]
    assert abs(left - (255 - right)) <= 3


def test_crop_centres_an_off_centre_field_and_keeps_outside_black(retina):
    image, _ = burned_in_text(*off_centre(*retina))
    field = locate_fundus(image)
    assert field is not None
    crop = crop_to_field(image, field, 128)
    inside = field_mask((128, 128), FundusField(64, 64, 64, 0, 128))
    assert not crop[inside == 0].any()  # text, frame and corners are gone
    assert (crop.max(axis=2)[inside == 1] > 0).mean() > 0.97


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((300, 400, 3), np.uint8),
        np.full((300, 400, 3), 128, np.uint8),
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
    ],
    ids=["black", "flat grey", "noise"],
)
def test_no_fundus_is_reported_not_guessed(image):
    assert locate_fundus(image) is None


def test_other_skimage_photos_are_not_fundus():
    """Real photos of other things (a rocket, a cat) must not yield a confident circle."""
    for name in ("rocket", "chelsea", "astronaut", "coffee"):
        assert locate_fundus(getattr(data, name)()) is None, name


def test_synthetic_fields_match_the_geometry_they_were_drawn_with():
    """The synthetic set (the default training data) crops as intended, cuts included."""
    from visioncare.data.synthetic.render import _render_scene

    for seed in range(10):
        image, geometry = _render_scene(seed % 5, 0, 256, np.random.default_rng(seed))[:2]
        field = locate_fundus(image)
        assert field is not None, seed
        assert field.radius == pytest.approx(geometry.radius, rel=0.03), seed
        cx, cy = geometry.centre
        assert np.hypot(field.center_x - cx, field.center_y - cy) <= 0.03 * geometry.radius
        if geometry.clip is not None:  # cut flat at centre ± clip
            assert field.top == pytest.approx(cy - geometry.clip, abs=2.5), seed
            assert field.bottom == pytest.approx(cy + geometry.clip, abs=2.5), seed


# --- Real exports: dim, pale, wide-field, one-edge clips, bars (issue 20) -------------------
#
# Each failure class is built from two sources: the real photo above and synthetic fields at
# several seeds and camera presets. Truth is the geometry the image was drawn with; masks are
# drawn here with numpy, independently of `field_mask`.

Source = tuple[np.ndarray, Circle]  # a square photo whose whole circle is inside it


def _synthetic(seed: int, preset: str, size: int = 384) -> Source:
    """A synthetic field without cuts (the renderer cuts half of them; those seeds are skipped)."""
    from visioncare.data.synthetic.difficulty import DIFFICULTY_PRESETS
    from visioncare.data.synthetic.render import _render_scene

    rng = np.random.default_rng(seed)
    while True:
        image, geometry = _render_scene(2, 0, size, rng, DIFFICULTY_PRESETS[preset])[:2]
        if geometry.clip is None:
            return image, (geometry.centre[0] + 0.5, geometry.centre[1] + 0.5, geometry.radius)


@pytest.fixture(scope="module")
def sources(retina) -> dict[str, Source]:
    drawn = [(3, "standard"), (7, "hard"), (11, "moderate")]
    return {"retina": retina, **{f"synthetic-{s}-{p}": _synthetic(s, p) for s, p in drawn}}


def _disc(shape: tuple[int, int], circle: Circle) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]] + 0.5
    return (xs - circle[0]) ** 2 + (ys - circle[1]) ** 2 <= circle[2] ** 2


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)


Box = tuple[float, float, float, float]


def _assert_located(
    image: np.ndarray, circle: Circle | None, box: Box, bar: np.ndarray | None = None
) -> None:
    """Circle within 3 % (where one is visible); the crop centres the visible box within 3 % of
    its side and the box fills >= 90 % of it along its longer axis; no pixel of ``bar`` kept."""
    field = locate_fundus(image)
    assert field is not None, "no fundus found"
    if circle is not None:
        cx, cy, r = circle
        assert abs(field.radius - r) <= 0.03 * r, (field, circle)
        assert np.hypot(field.center_x - cx, field.center_y - cy) <= 0.03 * r, (field, circle)
    left, top, side = crop_window(field)
    x0, y0, x1, y1 = box
    assert max(x1 - x0, y1 - y0) >= 0.9 * side, (field, box)
    assert max(x1 - x0, y1 - y0) <= 1.03 * side, (field, box)  # nothing of the field cut off
    assert abs((x0 + x1) / 2 - (left + side / 2)) <= 0.03 * side, (field, box)
    assert abs((y0 + y1) / 2 - (top + side / 2)) <= 0.03 * side, (field, box)
    if bar is not None:
        assert not crop_to_field(bar, field, 256).any(), "the bar survived the crop"


def _circle_box(circle: Circle) -> Box:
    cx, cy, r = circle
    return cx - r, cy - r, cx + r, cy + r


@pytest.mark.parametrize("luminance", [12, 20])
def test_dim_photos_with_jpeg_noise(sources, luminance):
    for name, (image, circle) in sources.items():
        inside = _disc(image.shape[:2], circle)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        dim = image.astype(np.float32) * (luminance / gray[inside].mean())
        noise = np.random.default_rng(1).normal(0, 2.0, image.shape)
        dim = _jpeg(np.clip(dim + noise, 0, 255).astype(np.uint8), 70)
        assert abs(cv2.cvtColor(dim, cv2.COLOR_RGB2GRAY)[inside].mean() - luminance) < 2.5
        try:
            _assert_located(dim, circle, _circle_box(circle))
        except AssertionError as error:
            raise AssertionError(name) from error


@pytest.mark.parametrize("colour", [(235, 220, 175), (240, 235, 215)], ids=["yellow", "white"])
@pytest.mark.parametrize("where", ["disc", "edge"])
def test_pale_yellow_white_atrophy_over_40_percent(sources, where, colour):
    """Pathologic myopia: a pale patch around the disc, or reaching the field's edge."""
    for name, (image, circle) in sources.items():
        cx, cy, r = circle
        shift = 0.35 * r if where == "disc" else 0.6 * r
        field = _disc(image.shape[:2], circle)
        patch = _disc(image.shape[:2], (cx + shift, cy, (0.63 if where == "disc" else 0.7) * r))
        patch &= field
        assert 0.35 <= patch.sum() / field.sum() <= 0.42
        pale = image.copy()
        texture = np.random.default_rng(2).normal(0, 6, (*image.shape[:2], 1))
        pale[patch] = np.clip(np.array(colour) + texture[patch], 0, 255).astype(np.uint8)
        try:
            _assert_located(pale, circle, _circle_box(circle))
        except AssertionError as error:
            raise AssertionError(name) from error


def _wide_field(
    texture: np.ndarray,
    frame: tuple[int, int],
    diameter: float,
    corner: float = 0.0,
    margin: int = 0,
    bar: bool = False,
) -> tuple[np.ndarray, Circle, Box, np.ndarray | None]:
    """A circle ``diameter`` px wide (texture stretched onto it) seen through a ``frame``
    (h, w) rectangle with rounded corners, set in a black canvas ``margin`` px wider on each
    side, with an optional white bar beside the frame."""
    height, width = frame
    canvas_hw = (height + 2 * margin, width + 2 * margin + (60 if bar else 0))
    d = round(diameter)
    stretched = cv2.resize(texture, (d, d), interpolation=cv2.INTER_CUBIC)
    cx, cy = margin + width / 2, margin + height / 2
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    x0, y0 = round(cx - d / 2), round(cy - d / 2)
    # Paste the stretched square, clipped to the canvas.
    sx0, sy0 = max(0, -x0), max(0, -y0)
    tx0, ty0 = max(0, x0), max(0, y0)
    tx1, ty1 = min(canvas_hw[1], x0 + d), min(canvas_hw[0], y0 + d)
    canvas[ty0:ty1, tx0:tx1] = stretched[sy0 : sy0 + ty1 - ty0, sx0 : sx0 + tx1 - tx0]
    circle = (x0 + d / 2, y0 + d / 2, d / 2)  # the texture is the square around its disc
    ys, xs = np.mgrid[: canvas_hw[0], : canvas_hw[1]] + 0.5
    rect = (margin, margin, margin + width, margin + height)
    visible = _disc(canvas_hw, circle) & (xs >= rect[0]) & (xs <= rect[2])
    visible &= (ys >= rect[1]) & (ys <= rect[3])
    if corner:
        dx = np.maximum(np.maximum(rect[0] + corner - xs, xs - (rect[2] - corner)), 0)
        dy = np.maximum(np.maximum(rect[1] + corner - ys, ys - (rect[3] - corner)), 0)
        visible &= dx**2 + dy**2 <= corner**2
    canvas[~visible] = 0
    bar_image = None
    if bar:
        bar_image = np.zeros_like(canvas)
        bar_image[:, rect[2] + 15 : rect[2] + 45] = 250
        canvas = np.maximum(canvas, bar_image)
    ys_v, xs_v = np.nonzero(visible)
    box = (xs_v.min(), ys_v.min(), xs_v.max() + 1, ys_v.max() + 1)
    half_diagonal = np.hypot(width, height) / 2
    arc_visible = circle[2] < 0.95 * half_diagonal and not corner
    return canvas, (circle if arc_visible else None), box, bar_image


def _texture(source: Source) -> np.ndarray:
    """The source's field as a square exactly around its circle (for stretching)."""
    image, (cx, cy, r) = source
    x0, y0 = round(cx - r), round(cy - r)
    side = round(2 * r)
    padded = cv2.copyMakeBorder(image, 50, 50, 50, 50, cv2.BORDER_CONSTANT, value=0)
    return padded[y0 + 50 : y0 + 50 + side, x0 + 50 : x0 + 50 + side]


WIDE_FIELDS = [  # (frame h, w), circle diameter / frame height, corner radius, margin
    ((300, 400), 1.2, 0, 0),
    ((300, 400), 1.5, 0, 0),
    ((300, 450), 1.4, 0, 20),
    ((280, 500), 2.0, 30, 20),
    ((300, 400), 2.0, 40, 0),
    ((320, 400), 1.7, 25, 30),
]


@pytest.mark.parametrize("bar", [False, True], ids=["plain", "bar"])
@pytest.mark.parametrize(("frame", "ratio", "corner", "margin"), WIDE_FIELDS)
def test_wide_field_exports(sources, frame, ratio, corner, margin, bar):
    if bar and not margin:
        margin = 10  # a bar beside the field needs the field to end before the frame does
    for name, source in sources.items():
        image, circle, box, bar_image = _wide_field(
            _texture(source), frame, ratio * frame[0], corner, margin, bar
        )
        try:
            _assert_located(_jpeg(image, 90), circle, box, bar_image)
        except AssertionError as error:
            raise AssertionError(name) from error


def _on_background(
    image: np.ndarray, bar: np.ndarray | None, colour: tuple[int, int, int], gain: float
) -> np.ndarray:
    """``image``'s black surround painted ``colour``, its field (not the bar) scaled by ``gain``."""
    bar_mask = np.zeros(image.shape[:2], bool) if bar is None else bar.max(axis=2) > 0
    field = (image.max(axis=2) > 0) & ~bar_mask
    out = image.astype(np.float32)
    out[field] *= gain
    out[~field & ~bar_mask] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


BACKGROUNDS = [(0, 0, 0), (70, 70, 70), (30, 60, 140)]  # black, grey frame, blue viewer


@pytest.mark.parametrize("gain", [1.0, 0.2], ids=["exposed", "dim"])
@pytest.mark.parametrize("colour", BACKGROUNDS[1:], ids=["grey", "blue"])
def test_wide_field_on_grey_or_coloured_backgrounds(sources, colour, gain):
    """A wide-field export with a bar, in a grey or blue surround, well exposed or dim."""
    frame, ratio, corner, margin = WIDE_FIELDS[3]
    for name in ("retina", "synthetic-7-hard"):
        image, circle, box, bar = _wide_field(
            _texture(sources[name]), frame, ratio * frame[0], corner, margin, bar=True
        )
        try:
            _assert_located(_jpeg(_on_background(image, bar, colour, gain), 80), circle, box, bar)
        except AssertionError as error:
            raise AssertionError(name) from error


@pytest.mark.slow
def test_wide_field_sweep(sources):
    """Every wide field x source x surround x exposure, each with a bar beside it."""
    for name, source in sources.items():
        for frame, ratio, corner, margin in WIDE_FIELDS:
            for colour in BACKGROUNDS:
                for gain in (1.0, 0.2):
                    image, circle, box, bar = _wide_field(
                        _texture(source), frame, ratio * frame[0], corner, max(margin, 10), True
                    )
                    image = _jpeg(_on_background(image, bar, colour, gain), 80)
                    try:
                        _assert_located(image, circle, box, bar)
                    except AssertionError as error:
                        raise AssertionError((name, frame, ratio, colour, gain)) from error


@pytest.mark.parametrize("side", ["top", "left", "bottom", "right"])
@pytest.mark.parametrize("share", [0.05, 0.1, 0.15])
def test_clip_at_one_edge_only(sources, share, side):
    """The frame clips the circle on one side only, by ``share`` of its radius."""
    for name, (image, (cx, cy, r)) in sources.items():
        canvas = cv2.copyMakeBorder(image, 0, 60, 80, 80, cv2.BORDER_CONSTANT, value=0)
        cut = round(cy - r + share * r)
        clipped = canvas[cut:]
        circle = (cx + 80, cy - cut, r)
        box = (cx + 80 - r, 0, cx + 80 + r, cy - cut + r)
        for _ in range(["top", "left", "bottom", "right"].index(side)):
            # A quarter turn counter-clockwise: (x, y) -> (y, W - x); the top goes left.
            width = clipped.shape[1]
            clipped = np.ascontiguousarray(np.rot90(clipped))
            circle = (circle[1], width - circle[0], r)
            box = (box[1], width - box[2], box[3], width - box[0])
        try:
            _assert_located(clipped, circle, box)
        except AssertionError as error:
            raise AssertionError(name) from error


def test_off_centre_dicom_cut_top_and_bottom(tmp_path, retina):
    from tests.test_dicom import write_dicom
    from visioncare.data.preprocess import PreprocessConfig, prepare

    image, (cx, cy, r) = retina
    frame = np.zeros((560, 1000, 3), np.uint8)
    x, y = 520, -73  # the circle runs off the top and bottom, and sits right of centre
    frame[0:560, x : x + 706] = image[-y : -y + 560, : min(706, 1000 - x)]
    circle = (cx + x, cy + y, r)
    out = prepare(write_dicom(tmp_path / "off.dcm", frame), PreprocessConfig(size=128))
    assert out.field is not None
    box = (max(0, circle[0] - r), 0, min(1000, circle[0] + r), 560)
    _assert_located(frame, circle, box)
    crop = out.image.max(axis=2) > 0
    cols = np.flatnonzero(crop.any(axis=0))
    assert abs((cols[0] + cols[-1] + 1) / 2 - 64) <= 0.03 * 128  # centred in the network's input


def test_a_page_of_text_and_a_blank_frame_are_not_fundus():
    """Pages, blank frames and a defocused glow (no aperture edge) are refused."""
    page = np.full((600, 450, 3), 245, np.uint8)
    for row in range(40, 560, 24):
        cv2.putText(page, "Lorem ipsum dolor sit amet, consectetur", (20, row),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1)  # fmt: skip
    assert locate_fundus(page) is None
    assert locate_fundus(np.full((600, 800, 3), 255, np.uint8)) is None
    ys, xs = np.mgrid[:600, :800]
    glow = 120 * np.exp(-((xs - 400) ** 2 + (ys - 300) ** 2) / (2 * 200**2))
    noise = np.random.default_rng(0).normal(0, 2, (600, 800, 3))
    glow = np.clip(glow[..., None] + noise, 0, 255).astype(np.uint8)
    assert locate_fundus(_jpeg(glow, 90)) is None
    for name in ("page", "text"):  # scikit-image's scanned pages (grayscale)
        scan = cv2.cvtColor(getattr(data, name)(), cv2.COLOR_GRAY2RGB)
        assert locate_fundus(scan) is None, name


def test_prepare_keeps_no_bar_of_a_large_wide_field_jpeg(tmp_path, sources):
    """Through `prepare` (reduced JPEG decoding, crop, flags): the network input has the field
    filling its width, centred, and not one pixel of the bar beside it."""
    from visioncare.data.preprocess import PreprocessConfig, prepare
    from visioncare.data.quality import QualityThresholds

    image = _wide_field(_texture(sources["retina"]), (1300, 1900), 1.6 * 1300, 120, 60, bar=True)[0]
    path = tmp_path / "wide.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = prepare(path, PreprocessConfig(size=128), QualityThresholds())
    assert out.field is not None and out.gradable
    shown = out.image.max(axis=2) > 8
    cols, rows = np.flatnonzero(shown.any(axis=0)), np.flatnonzero(shown.any(axis=1))
    assert cols[0] <= 2 and cols[-1] >= 125  # fills the width (the longer axis)
    assert abs((rows[0] + rows[-1] + 1) / 2 - 64) <= 0.03 * 128  # centred vertically
    assert (out.image.min(axis=2) > 240).sum() == 0  # no white bar pixel
