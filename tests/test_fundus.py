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
