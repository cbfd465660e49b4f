"""Preprocessing on odd-but-valid and broken image files, JPEG reduced decoding, and the cache.

Real collections are messy: Messidor-2 mixes `.png` and upper-case `.JPG`, some copies hold
grayscale or 16-bit scans, re-hosted archives carry PNGs renamed to `.jpg`, and downloads get cut
short. Every valid file must come out as RGB uint8 (H, W, 3); every broken one must raise
`UnreadableImageError` naming the file, so the datamodule can list the culprits instead of
crashing inside a DataLoader worker halfway through an epoch.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from visioncare.data import fundus
from visioncare.data.cache import PreprocessedCache
from visioncare.data.preprocess import (
    PreprocessConfig,
    UnreadableImageError,
    ben_graham,
    prepare,
    preprocess,
    read_image,
)
from visioncare.data.quality import QualityThresholds


def _write(path: Path, image: np.ndarray, ext: str | None = None) -> Path:
    """Encode ``image`` (BGR/BGRA/gray, OpenCV order) as ``ext`` and write it under ``path``.

    The format comes from ``ext`` (default: the path's suffix), so a PNG can be written under a
    `.jpg` name.
    """
    ok, buffer = cv2.imencode(ext or path.suffix.lower(), image)
    assert ok
    path.write_bytes(buffer.tobytes())
    return path


def _disc(height: int, width: int, radius: int, value: int = 200) -> np.ndarray:
    """A bright, textured disc centred on a black canvas: a crude fundus photograph (BGR)."""
    image = np.zeros((height, width, 3), np.uint8)
    cv2.circle(image, (width // 2, height // 2), radius, (value // 3, value // 2, value), -1)
    # Texture so JPEG has something to encode and the decode is not trivially flat.
    noise = np.random.default_rng(0).integers(0, 30, (height, width, 3), dtype=np.uint8)
    return np.where(image > 0, image - noise // 2, 0).astype(np.uint8)


def _assert_rgb_uint8(image: np.ndarray) -> None:
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3


# ---------------------------------------------------------------- unusual but valid inputs


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_grayscale_becomes_rgb(tmp_path: Path, ext: str) -> None:
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    image = read_image(_write(tmp_path / f"gray{ext}", gray))
    _assert_rgb_uint8(image)
    assert image.shape[:2] == (48, 64)
    # All three channels carry the gray value (JPEG may shift it by a few levels).
    assert np.array_equal(image[..., 0], image[..., 1])
    assert np.array_equal(image[..., 1], image[..., 2])
    assert np.abs(image[..., 0].astype(int) - gray).max() <= 8


def test_rgba_png_drops_alpha_and_keeps_rgb_order(tmp_path: Path) -> None:
    bgra = np.zeros((32, 40, 4), np.uint8)
    bgra[..., 2] = 255  # pure red in OpenCV's BGR order
    bgra[..., 3] = 100  # half-transparent: must not darken or tint the colour
    image = read_image(_write(tmp_path / "rgba.png", bgra))
    _assert_rgb_uint8(image)
    assert image.shape[:2] == (32, 40)
    assert (image[..., 0] == 255).all() and (image[..., 1:] == 0).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path, channels: int) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    source = ramp if channels == 1 else np.stack([ramp, ramp // 2, ramp // 4], axis=2)
    image = read_image(_write(tmp_path / f"deep{channels}.png", source))
    _assert_rgb_uint8(image)
    assert image.shape[:2] == (16, 256)
    # 0..65535 maps onto 0..255 in order: no wrap-around (uint16 → uint8 cast) and no clipping.
    expected = ramp / 257.0
    full = image[..., 2]  # the source's B channel (BGR) carries the full ramp; RGB puts it last
    assert image.max() == 255 and image.min() == 0
    assert np.abs(full.astype(float) - expected).max() <= 1.5
    assert (np.diff(full[0].astype(int)) >= 0).all()
    if channels == 3:  # the other channels keep their own scale (no per-channel stretching)
        assert np.abs(image[..., 0].astype(float) - expected / 4).max() <= 1.5


def test_png_bytes_under_jpg_name(tmp_path: Path) -> None:
    """The format comes from the bytes: a PNG renamed to .jpg still decodes, target or not."""
    path = _write(tmp_path / "really_a_png.jpg", _disc(300, 400, 120), ext=".png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = read_image(path)
    _assert_rgb_uint8(full)
    assert full.shape == (300, 400, 3)
    # With a target the JPEG reduced-decoding path is tried first; whatever it does with PNG
    # bytes, the result is a valid image that still covers the target size.
    reduced = read_image(path, target=64)
    _assert_rgb_uint8(reduced)
    assert min(reduced.shape[:2]) >= 64


def test_upper_case_jpg_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "IMG_0001.JPG", _disc(1300, 2000, 600))
    image = read_image(path, target=256)
    _assert_rgb_uint8(image)
    assert image.shape == (325, 500, 3)  # reduced decoding applies: the suffix test is lower()
    out = preprocess(path, PreprocessConfig(size=256))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------- broken inputs


def _assert_unreadable(path: Path, target: int | None = None) -> str:
    """Both entry points raise `UnreadableImageError` naming the file; returns the message."""
    with pytest.raises(UnreadableImageError) as info:
        read_image(path, target=target)
    assert path.name in str(info.value)
    with pytest.raises(UnreadableImageError):
        preprocess(path, PreprocessConfig(size=64))
    return str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in _assert_unreadable(path)


@pytest.mark.parametrize("target", [None, 64])
def test_truncated_jpeg(tmp_path: Path, target: int | None) -> None:
    """A download cut in half: the JPEG header is intact, the entropy-coded data is not.

    OpenCV 4.x decodes such a file without error (garbage below the cut), so `read_image` checks
    the end-of-image marker itself and refuses it on every OpenCV version.
    """
    path = _write(tmp_path / "full.jpg", _disc(300, 400, 140))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match=r"truncated\.jpg is a truncated JPEG"):
        read_image(truncated, target=target)
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(data + b"\x00" * 100)  # metadata after the end marker is fine
    assert read_image(trailing, target=target).shape == read_image(path, target=target).shape


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _assert_unreadable(path)
    _assert_unreadable(path, target=64)


def test_random_bytes_after_jpeg_magic(tmp_path: Path) -> None:
    """A JPEG signature followed by garbage: the header probe fails and decoding must too."""
    path = tmp_path / "fake.jpg"
    payload = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path.write_bytes(b"\xff\xd8\xff\xe0" + payload)
    _assert_unreadable(path, target=64)


def test_missing_file(tmp_path: Path) -> None:
    _assert_unreadable(tmp_path / "does_not_exist.jpg")


# ---------------------------------------------------------------- crop, Ben Graham, resize


def test_prepare_centres_the_field_and_reports_it_in_photo_pixels(tmp_path: Path) -> None:
    """An off-centre disc: the crop centres it, the field is in the photo's own pixels."""
    canvas = np.zeros((300, 600, 3), np.uint8)
    cv2.circle(canvas, (250, 140), 100, (40, 90, 180), -1)  # BGR: a reddish disc
    path = _write(tmp_path / "disc.png", canvas)
    out = prepare(path, PreprocessConfig(size=64), QualityThresholds())
    assert (out.width, out.height) == (600, 300)
    assert out.field is not None
    assert out.field.center_x == pytest.approx(250.5, abs=1.5)
    assert out.field.center_y == pytest.approx(140.5, abs=1.5)
    assert out.field.radius == pytest.approx(100, abs=2)
    mask = out.image.max(axis=2) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert rows[0] <= 1 and rows[-1] >= 62 and cols[0] <= 1 and cols[-1] >= 62  # fills it
    assert mask.mean() == pytest.approx(np.pi / 4, abs=0.03)


def test_reduced_decoding_reports_the_field_in_full_size_pixels(tmp_path: Path) -> None:
    """A 2000×1300 JPEG decoded at 1/4: the field still comes back in the photo's pixels."""
    path = _write(tmp_path / "large.jpg", _disc(1300, 2000, 600))
    out = prepare(path, PreprocessConfig(size=256))
    assert (out.width, out.height) == (2000, 1300)
    assert out.field is not None
    assert out.field.center_x == pytest.approx(1000, abs=8)
    assert out.field.radius == pytest.approx(600, abs=12)


def test_no_fundus_is_padded_whole_and_flagged(tmp_path: Path) -> None:
    black = _write(tmp_path / "black.png", np.zeros((120, 200, 3), np.uint8))
    out = prepare(black, PreprocessConfig(size=50), QualityThresholds())
    assert out.field is None and out.quality == "no_fundus_found"
    assert out.image.shape == (50, 50, 3) and not out.image.any()
    grey = np.full((120, 200, 3), 90, np.uint8)
    out = prepare(_write(tmp_path / "grey.png", grey), PreprocessConfig(size=50))
    assert out.field is None
    assert out.image[:10].max() == 0 and out.image[25, 25].max() == 90  # padded, not cropped


def test_uncropped_photos_are_still_judged(tmp_path: Path) -> None:
    """crop_fundus=false pads the whole photo, but the field is located for the flag."""
    canvas = np.zeros((300, 600, 3), np.uint8)
    cv2.circle(canvas, (250, 140), 100, (8, 12, 30), -1)  # a very dark disc
    path = _write(tmp_path / "dark.png", canvas)
    out = prepare(path, PreprocessConfig(size=60, crop_fundus=False), QualityThresholds())
    assert out.field is not None and out.quality == "too_dark"
    assert not out.image[:15].any() and out.image[15:45].any()  # padded whole, not cropped


def test_old_preprocessing_json_loads_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from visioncare.data.input_spec import InputSpec

    old = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    old["preprocess"] = {"size": 72, "crop_fundus": True, "ben_graham": False, "threshold": 10}
    with caplog.at_level("WARNING", logger="visioncare"):
        spec = InputSpec.from_dict(old)
    assert spec.preprocess == PreprocessConfig(size=72)
    assert "re-export" in caplog.text
    caplog.clear()
    assert InputSpec.from_dict(spec.as_dict()) == spec and not caplog.text


def test_a_new_localisation_algorithm_gets_a_new_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached crops made by another algorithm version are never reused."""
    config = PreprocessConfig(size=64)
    assert config.as_dict()["localisation"] == fundus.LOCALISATION_VERSION
    before = PreprocessedCache(tmp_path, config).folder
    monkeypatch.setattr("visioncare.data.preprocess.LOCALISATION_VERSION", "circle-cuts-next")
    assert PreprocessedCache(tmp_path, config).folder != before
    old_keys = {"size": 64, "crop_fundus": True, "ben_graham": False, "threshold": 10}
    assert PreprocessConfig.from_dict(old_keys) == config  # old exports still load


def test_ben_graham_keeps_dtype_and_centres_flat_image() -> None:
    flat = np.full((96, 96, 3), 77, np.uint8)
    out = ben_graham(flat)
    assert out.dtype == np.uint8 and out.shape == flat.shape
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_ben_graham_on_a_fundus_keeps_shape() -> None:
    image = cv2.cvtColor(_disc(128, 128, 60), cv2.COLOR_BGR2RGB)
    out = ben_graham(image)
    assert out.dtype == np.uint8 and out.shape == image.shape


@pytest.mark.parametrize(
    "config",
    [
        PreprocessConfig(size=96),
        PreprocessConfig(size=96, crop_fundus=False),
        PreprocessConfig(size=96, ben_graham=True),
        PreprocessConfig(size=512),  # upsampling path (INTER_CUBIC)
    ],
)
def test_preprocess_returns_square_rgb(tmp_path: Path, config: PreprocessConfig) -> None:
    path = _write(tmp_path / "fundus.jpg", _disc(300, 450, 140))
    out = preprocess(path, config)
    assert out.shape == (config.size, config.size, 3)
    assert out.dtype == np.uint8


# ---------------------------------------------------------------- JPEG reduced decoding


def test_reduced_decoding_for_large_jpeg_not_for_png(tmp_path: Path) -> None:
    """A 2000×1300 photo for a 256 px cache: libjpeg decodes at 1/4 scale, a PNG cannot."""
    source = _disc(1300, 2000, 600)
    jpeg = read_image(_write(tmp_path / "large.jpg", source), target=256)
    # Short side 1300: /8 = 162 < 256·1.1, /4 = 325 >= 282, so factor 4 (ceil of 2000/4, 1300/4).
    assert jpeg.shape == (325, 500, 3)
    assert read_image(tmp_path / "large.jpg").shape == (1300, 2000, 3)  # no target: full size
    png = read_image(_write(tmp_path / "large.png", source), target=256)
    assert png.shape == (1300, 2000, 3)


def test_reduced_decoding_keeps_enough_pixels(tmp_path: Path) -> None:
    """A JPEG barely above the target is decoded at full size: never below target·1.1."""
    image = read_image(_write(tmp_path / "small.jpg", _disc(300, 400, 140)), target=256)
    assert image.shape == (300, 400, 3)


# ---------------------------------------------------------------- cache


def test_cache_build_reports_unreadable_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jpg", _disc(300, 400, 140))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    cache = PreprocessedCache(tmp_path / "cache", PreprocessConfig(size=64))

    entries, errors = cache.build([good, bad, empty, missing], num_workers=2)

    assert set(entries) == {good}
    assert set(errors) == {bad, empty, missing}
    for source, message in errors.items():
        assert source.name in message
    cached = np.load(entries[good])
    assert cached.shape == (64, 64, 3) and cached.dtype == np.uint8
    files = [p for p in cache.folder.rglob("*") if p.is_file()]
    assert not [p for p in files if "tmp" in p.name or p.name.startswith(".")]
    assert sorted(p.name for p in files) == sorted(["params.json", entries[good].name])

    # A second build reuses the entry instead of rewriting it.
    mtime = entries[good].stat().st_mtime_ns
    again, errors_again = cache.build([good, bad], num_workers=2)
    assert again == {good: entries[good]} and set(errors_again) == {bad}
    assert entries[good].stat().st_mtime_ns == mtime


def test_cache_build_warns_about_photos_without_a_fundus(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _write(tmp_path / "good.jpg", _disc(300, 400, 140))
    blank = _write(tmp_path / "blank.png", np.full((100, 120, 3), 90, np.uint8))
    cache = PreprocessedCache(tmp_path / "cache", PreprocessConfig(size=64))
    with caplog.at_level("WARNING", logger="visioncare.data.cache"):
        entries, errors = cache.build([good, blank], num_workers=1)
    assert set(entries) == {good, blank} and not errors  # kept, padded whole
    assert "No fundus field found in 1 image(s)" in caplog.text and "blank.png" in caplog.text


def test_a_small_field_in_a_large_jpeg_is_decoded_at_full_size(tmp_path: Path) -> None:
    """Reduced decoding would leave a 150 px field 37 px wide: it is decoded again in full."""
    canvas = np.zeros((1300, 2000, 3), np.uint8)
    canvas[400:700, 900:1200] = _disc(300, 300, 150)
    path = _write(tmp_path / "small_field.jpg", canvas)
    out = prepare(path, PreprocessConfig(size=256))
    assert out.field is not None
    assert out.field.radius == pytest.approx(150, abs=3)
    full = read_image(path)  # no target: every pixel
    reference = fundus.crop_to_field(full, fundus.locate_fundus(full), 256)
    # The texture survives: the crop equals the one from the full decode, not an upsampled blur.
    assert np.abs(out.image.astype(int) - reference).mean() < 1.0
