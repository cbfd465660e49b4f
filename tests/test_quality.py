"""Quality flags on the real retina photo and degraded versions of it.

These are the measurements the thresholds in `QualityThresholds` were chosen between: each
limit must flag the stronger degradation and pass the milder one (and the clean photo).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from visioncare.data.fundus import locate_fundus
from visioncare.data.quality import UNGRADABLE_FLAGS, QualityThresholds, assess, is_gradable


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return data.retina()  # 1411 px, the scale the thresholds were measured at


def _flag(image: np.ndarray, min_diameter: float = 256) -> str:
    return assess(image, locate_fundus(image), QualityThresholds(), min_diameter)


def _scaled(image: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("degrade", "expected"),
    [
        (lambda im: im, "ok"),
        (lambda im: _scaled(im, 0.25), "ok"),
        (lambda im: _scaled(im, 0.2), "too_dark"),
        (lambda im: _scaled(im, 1.6), "ok"),
        (lambda im: _scaled(im, 2.0), "overexposed"),
        (lambda im: cv2.GaussianBlur(im, (0, 0), 4), "ok"),
        (lambda im: cv2.GaussianBlur(im, (0, 0), 6), "blurred"),
        (lambda im: cv2.resize(im, (200, 200), interpolation=cv2.INTER_AREA), "small_field"),
    ],
    ids=["clean", "dark 0.25", "dark 0.2", "bright 1.6", "bright 2", "blur 4", "blur 6", "small"],
)
def test_each_flag_sits_between_two_degradations(retina, degrade, expected):
    assert _flag(degrade(retina)) == expected


def test_several_reasons_are_joined_and_no_field_is_its_own_flag(retina):
    dark_and_small = cv2.resize(_scaled(retina, 0.15), (200, 200), interpolation=cv2.INTER_AREA)
    assert _flag(dark_and_small) == "small_field;too_dark"
    assert assess(retina, None, QualityThresholds(), 256) == "no_fundus_found"
    # A darker photo also has less contrast: it is reported as dark, not also as blurred.
    assert "blurred" not in _flag(_scaled(retina, 0.1))


def test_thresholds_are_configurable(retina):
    strict = QualityThresholds(blurred=0.5)
    assert assess(retina, locate_fundus(retina), strict, 256) == "blurred"


@pytest.mark.parametrize(
    ("quality", "gradable"),
    [
        ("ok", True),
        ("small_field", True),
        ("no_fundus_found", False),
        ("too_dark", False),
        ("overexposed", False),
        ("blurred", False),
        ("small_field;too_dark", False),
    ],
)
def test_gradable_rule(quality, gradable):
    """Gradable = field found and no flag that hides lesions; `small_field` alone is kept."""
    assert is_gradable(quality) is gradable


def test_prepared_photos_carry_the_gradable_rule(tmp_path, retina):
    from visioncare.data.preprocess import PreprocessConfig, prepare

    config = PreprocessConfig(size=64)
    for name, image, expected in [
        ("clean", retina, True),
        ("dark", _scaled(retina, 0.15), False),
        ("blank", np.zeros((200, 300, 3), np.uint8), False),
    ]:
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        judged = prepare(path, config, QualityThresholds(min_diameter=64))
        assert judged.gradable is expected, (name, judged.quality)
        assert judged.gradable == is_gradable(judged.quality)
        assert prepare(path, config).gradable is None  # not judged without thresholds
    assert "no_fundus_found" in UNGRADABLE_FLAGS
