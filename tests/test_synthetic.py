"""Synthetic IDRiD generator: class proportions, clinical rules, no grade leak, layout, caching.

Kept fast (small images, few files): the generator is the data source of every default run, so
its contract (labels come only from drawn lesions, IDRiD's exact layout, safe reuse) is what
these tests pin down.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from visioncare.data import synthetic as syn
from visioncare.data.synthetic import writer
from visioncare.data.synthetic.grades import IDRID_TRAIN_COUNTS_DR, _grader_labels, sample_grades
from visioncare.data.synthetic.lesions import LESION_KINDS
from visioncare.data.synthetic.render import _render_scene, render_fundus
from visioncare.data.synthetic.writer import SYNTHETIC_MANIFEST, generate_synthetic_idrid

GRADING = "B. Disease Grading"
TRAIN_DIR = Path(GRADING, "1. Original Images", "a. Training Set")
TEST_DIR = Path(GRADING, "1. Original Images", "b. Testing Set")
TRAIN_CSV = Path(GRADING, "2. Groundtruths", "a. IDRiD_Disease Grading_Training Labels.csv")
TEST_CSV = Path(GRADING, "2. Groundtruths", "b. IDRiD_Disease Grading_Testing Labels.csv")
VALID_PAIRS = [(dr, dme) for dr in range(5) for dme in range(3) if dme == 0 or dr >= 2]
SMALL = {"num_train": 6, "num_test": 3, "image_size": 96, "seed": 3, "num_workers": 0}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _read_csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Class proportions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_sample_grades_reproduces_idrid_training_counts(seed):
    grades = sample_grades(413, seed)
    dr = Counter(g[0] for g in grades)
    dme = Counter(g[1] for g in grades)
    assert tuple(dr[k] for k in range(5)) == IDRID_TRAIN_COUNTS_DR
    assert tuple(dme[k] for k in range(3)) == (177, 41, 195)
    assert not [g for g in grades if g[0] < 2 and g[1] > 0], "DME > 0 needs DR >= 2"


@pytest.mark.parametrize("n", [20, 27, 50, 103])
def test_sample_grades_small_sets_keep_every_class(n):
    grades = sample_grades(n, 0)
    assert len(grades) == n
    assert {g[0] for g in grades} == set(range(5))
    assert {g[1] for g in grades} == set(range(3))
    assert all(g in VALID_PAIRS for g in grades)


def test_sample_grades_is_deterministic_and_shuffled():
    assert sample_grades(60, 4) == sample_grades(60, 4)
    assert sample_grades(60, 4) != sample_grades(60, 5)
    assert sorted(sample_grades(60, 4)) == sorted(sample_grades(60, 5))  # same counts
    assert sample_grades(0, 0) == []


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed():
    a = render_fundus(3, 2, 128, np.random.default_rng(7))
    b = render_fundus(3, 2, 128, np.random.default_rng(7))
    c = render_fundus(3, 2, 128, np.random.default_rng(8))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not a[0, 0].any() and not a[-1, -1].any()  # black outside the fundus field
    assert a[64, 64].mean() > 40  # lit retina in the middle


@pytest.mark.parametrize("dr, dme", [(5, 0), (-1, 0), (0, 3), (2, -1), (1, 1), (0, 2)])
def test_render_rejects_bad_grades(dr, dme):
    with pytest.raises(ValueError, match="grade"):
        render_fundus(dr, dme, 128, np.random.default_rng(0))


def _scene(dr: int, dme: int, seed: int, size: int = 192, difficulty=None):
    return _render_scene(dr, dme, size, np.random.default_rng([seed, dr, dme]), difficulty)


@pytest.mark.parametrize("preset", sorted(syn.DIFFICULTY_PRESETS))
@pytest.mark.parametrize("dr, dme", VALID_PAIRS)
def test_lesions_follow_the_clinical_rules(dr, dme, preset):
    for seed in range(3):
        _, geom, _, lesions = _scene(dr, dme, seed, difficulty=syn.DIFFICULTY_PRESETS[preset])
        kinds = Counter(les.kind for les in lesions)
        assert set(kinds) <= set(LESION_KINDS)
        assert all(geom.visible(les.x, les.y) for les in lesions), "every lesion must be seen"
        per_quadrant = Counter(geom.quadrant(h.x, h.y) for h in lesions if h.kind == "haemorrhage")
        proliferative = kinds["neovascularisation"] + kinds["preretinal_haemorrhage"]
        if dr == 0:
            assert not lesions
        elif dr == 1:
            assert set(kinds) == {"microaneurysm"} and 2 <= kinds["microaneurysm"] <= 6
        elif dr == 2:
            assert kinds["microaneurysm"] >= 1 and 3 <= kinds["haemorrhage"] <= 8
            assert kinds["venous_beading"] == 0 and proliferative == 0
        else:  # severe NPDR background (4-2-1 rule) for both 3 and 4
            assert min(per_quadrant[q] for q in range(4)) >= 5
            assert kinds["venous_beading"] >= 1
            assert (proliferative > 0) == (dr == 4)

        dd = geom.disc_diameter
        fovea_dd = [
            math.hypot(e.x - geom.fovea[0], e.y - geom.fovea[1]) / dd
            for e in lesions
            if e.kind == "hard_exudate"
        ]
        if dme == 0:
            assert not fovea_dd, "DME 0 means no hard exudates at all"
        elif dme == 1:
            assert fovea_dd and min(fovea_dd) > 1.0, "DME 1: all exudates beyond 1 DD"
        else:
            assert min(fovea_dd) < 1.0, "DME 2: an exudate within 1 DD of the fovea"


def test_geometry_is_a_plausible_fundus():
    for seed in range(10):
        _, geom, vessels, _ = _scene(0, 0, seed)
        size = geom.size
        assert 0.42 * size <= geom.radius <= 0.48 * size
        assert 0.15 <= geom.disc_diameter / (2 * geom.radius) <= 0.18
        assert 2.2 <= geom.dist_dd(*geom.disc, geom.fovea) <= 2.8
        assert geom.visible(*geom.disc) and geom.visible(*geom.fovea)
        assert (geom.disc[0] - geom.fovea[0]) * geom.side > 0, "disc on the nasal side"
        assert sum(v.depth == 0 and v.vein for v in vessels) == 4
    assert {_scene(0, 0, s)[1].side for s in range(10)} == {-1, 1}, "both eyes occur"


def _footprint(shape: tuple[int, int], lesions, margin: float) -> np.ndarray:
    """Pixels a lesion may touch (its extent plus blur margin)."""
    mask = np.zeros(shape, np.uint8)
    for les in lesions:
        circles = [(les.x, les.y, les.radius * 1.7)]
        if les.kind == "venous_beading":
            circles = list(les.params["beads"])
        elif les.kind == "haemorrhage":
            reach = max(math.hypot(px, py) + max(a, b) for px, py, a, b, _ in les.params["parts"])
            circles = [(les.x, les.y, reach)]
        for x, y, r in circles:
            cv2.circle(mask, (round(x), round(y)), math.ceil(r + margin), 1, -1)
    return mask.astype(bool)


@pytest.mark.parametrize("dr, dme", [(1, 0), (2, 1), (4, 2)])
def test_grade_changes_only_pixels_near_lesions(dr, dme):
    """Same seed at two grades: identical eye, colours and noise; only lesion areas differ."""
    for seed in range(3):
        healthy = render_fundus(0, 0, 160, np.random.default_rng([seed]))
        image, _, _, lesions = _render_scene(dr, dme, 160, np.random.default_rng([seed]))
        changed = np.any(healthy != image, axis=2)
        assert changed.any()
        outside = changed & ~_footprint(changed.shape, lesions, margin=4)
        assert not outside.any(), f"{outside.sum()} pixels changed away from any lesion"


def test_no_global_brightness_leak_between_grades():
    """DR 4 images are not globally darker or brighter than DR 0 beyond their lesions."""
    seeds = range(20)
    dr0 = np.array([render_fundus(0, 0, 128, np.random.default_rng([s])).mean() for s in seeds])
    dr4 = np.array([render_fundus(4, 1, 128, np.random.default_rng([s])).mean() for s in seeds])
    other = [render_fundus(4, 1, 128, np.random.default_rng([s + 1000])).mean() for s in seeds]
    spread = dr0.std(ddof=1)
    assert spread > 3.0, "global brightness should vary from image to image"
    # Paired: same eye and camera, so the difference is the lesions' own area only.
    assert abs((dr4 - dr0).mean()) < 0.3 * spread
    # Unpaired (independent seeds): means within a fraction of the between-image spread.
    pooled = math.sqrt((dr0.var(ddof=1) + np.var(other, ddof=1)) / 2)
    assert abs(np.mean(other) - dr0.mean()) < 0.75 * pooled


def test_lesions_stay_visible_after_resizing_to_224():
    """Microaneurysms (the only DR 1 sign) keep >= ~1.2 px radius and contrast at 224 px."""
    image, _, _, lesions = _render_scene(1, 0, 512, np.random.default_rng(5))
    small = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
    healthy = render_fundus(0, 0, 512, np.random.default_rng(5))
    small0 = cv2.resize(healthy, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
    scale = 224 / 512
    for ma in lesions:
        assert ma.radius * scale >= 1.0
        x, y = round(ma.x * scale), round(ma.y * scale)
        darker = small0[y, x, :2].mean() - small[y, x, :2].mean()
        assert darker > 10, "a microaneurysm must stay visibly darker at 224 px"


def test_harder_presets_draw_smaller_fainter_fewer_lesions():
    """Same seed, same grade: the hard preset's lesions are smaller, fewer and less contrasted."""
    hard = syn.DIFFICULTY_PRESETS["hard"]
    counts = {"standard": 0, "hard": 0}
    for seed in range(6):
        *_, standard = _scene(3, 2, seed, 256)
        *_, faint = _scene(3, 2, seed, 256, hard)
        counts["standard"] += len(standard)
        counts["hard"] += len(faint)
        for kind in ("microaneurysm", "hard_exudate"):
            big = np.mean([les.radius for les in standard if les.kind == kind])
            small = np.mean([les.radius for les in faint if les.kind == kind])
            assert small < 0.9 * big, kind
    assert counts["hard"] < 0.85 * counts["standard"]

    # Contrast of the lesions against the same eye without them (same seed, grade 0).
    def lesion_contrast(difficulty) -> float:
        diffs = []
        for seed in range(4):
            rng = [seed, 2, 0]
            image, _, _, lesions = _render_scene(2, 0, 256, np.random.default_rng(rng), difficulty)
            healthy = render_fundus(0, 0, 256, np.random.default_rng(rng), difficulty)
            mask = _footprint(image.shape[:2], lesions, margin=0)
            diffs.append(np.abs(image.astype(float) - healthy)[mask].mean())
        return float(np.mean(diffs))

    assert lesion_contrast(hard) < 0.75 * lesion_contrast(None)


def test_grader_noise_moves_grades_to_neighbours_at_the_stated_rate():
    grades = sample_grades(4000, 0)
    noisy = _grader_labels(grades, 0.1, np.random.default_rng(0))
    moved_dr = [(a[0], b[0]) for a, b in zip(grades, noisy, strict=True) if a[0] != b[0]]
    assert all(abs(a - b) == 1 for a, b in moved_dr)
    assert all(dme == 0 or dr >= 2 for dr, dme in noisy), "DME > 0 keeps DR >= 2"
    # 10 % draw a move; moves off the scale (DR 0 down, 4 up) or breaking DME's rule are kept.
    assert 0.06 < len(moved_dr) / len(grades) < 0.1
    assert _grader_labels(grades, 0.0, np.random.default_rng(0)) == grades


def test_hard_set_on_disk_records_its_difficulty_and_noisy_labels(tmp_path):
    hard = syn.DIFFICULTY_PRESETS["hard"]
    params = {**SMALL, "num_train": 40, "num_test": 2, "image_size": 64}
    root = generate_synthetic_idrid(tmp_path / "ds", **params, difficulty=hard)
    manifest = json.loads((root / SYNTHETIC_MANIFEST).read_text())
    assert manifest["params"]["difficulty"]["label_noise"] == 0.1
    written = [(int(r[1]), int(r[2])) for r in _read_csv(root / TRAIN_CSV)[1:]]
    changed = sum(a != b for a, b in zip(written, sample_grades(40, 3), strict=True))
    assert changed == manifest["relabelled_by_grader_noise"]["train"] > 0
    before = (root / TRAIN_DIR / "IDRiD_001.jpg").read_bytes()
    generate_synthetic_idrid(root, **params)  # standard again: rebuilt, labels clean
    assert (root / TRAIN_DIR / "IDRiD_001.jpg").read_bytes() != before
    assert "difficulty" not in json.loads((root / SYNTHETIC_MANIFEST).read_text())["params"]


def test_unknown_difficulty_preset_names_the_key(tmp_path):
    from visioncare.data.sources.synthetic import SyntheticSource
    from visioncare.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"data\.difficulty='brutal'.*hard"):
        SyntheticSource(tmp_path, difficulty="brutal")
    with pytest.raises(ConfigurationError, match=r"data\.label_noise=0.9"):
        SyntheticSource(tmp_path, difficulty="hard", label_noise=0.9)


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def test_writes_idrid_layout(tmp_path):
    root = generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    assert root == tmp_path / "ds"
    for rel in (TRAIN_DIR, TEST_DIR, TRAIN_CSV, TEST_CSV):
        assert (root / rel).exists(), rel
    lines = (root / TRAIN_CSV).read_text().splitlines()
    assert lines[0] == "Image name,Retinopathy grade,Risk of macular edema "
    train_rows, test_rows = _read_csv(root / TRAIN_CSV)[1:], _read_csv(root / TEST_CSV)[1:]
    assert [r[0] for r in train_rows] == [f"IDRiD_{i:03d}" for i in range(1, 7)]
    assert [r[0] for r in test_rows] == ["IDRiD_001", "IDRiD_002", "IDRiD_003"]
    assert [(int(r[1]), int(r[2])) for r in train_rows] == sample_grades(6, 3)
    assert [(int(r[1]), int(r[2])) for r in test_rows] == sample_grades(3, 4)
    assert sorted(p.name for p in (root / TEST_DIR).iterdir()) == [
        f"IDRiD_00{i}.jpg" for i in (1, 2, 3)
    ]
    image = cv2.imread(str(root / TRAIN_DIR / "IDRiD_001.jpg"), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (96, 96, 3)
    manifest = json.loads((root / SYNTHETIC_MANIFEST).read_text())
    assert manifest["params"] == {
        "generator_version": writer.GENERATOR_VERSION,
        "num_train": 6,
        "num_test": 3,
        "image_size": 96,
        "seed": 3,
    }
    dr_counts = Counter(int(r[1]) for r in train_rows)
    assert manifest["class_counts"]["train"]["dr"] == [dr_counts[k] for k in range(5)]
    assert not list(tmp_path.glob(".ds.tmp-*")), "temp build folder must be gone"


def test_image_names_widen_only_past_999():
    assert writer._image_names(999)[-1] == "IDRiD_999"
    assert writer._image_names(1000)[0] == "IDRiD_0001"


def test_pixels_do_not_depend_on_worker_count(tmp_path):
    params = {**SMALL, "num_train": 4, "num_test": 2}
    serial = generate_synthetic_idrid(tmp_path / "serial", **{**params, "num_workers": 0})
    pooled = generate_synthetic_idrid(tmp_path / "pooled", **{**params, "num_workers": 2})
    for rel in ("a. Training Set/IDRiD_004.jpg", "b. Testing Set/IDRiD_002.jpg"):
        path = Path(GRADING, "1. Original Images", rel)
        assert (serial / path).read_bytes() == (pooled / path).read_bytes()


def test_reuses_identical_dataset_without_rewriting(tmp_path):
    root = generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    before = _mtimes(root)
    assert generate_synthetic_idrid(tmp_path / "ds", **{**SMALL, "num_workers": 2}) == root
    assert _mtimes(root) == before


def test_regenerates_when_parameters_change(tmp_path):
    root = generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    (root / "notes.txt").write_text("user file next to the dataset")
    old_image = (root / TRAIN_DIR / "IDRiD_001.jpg").read_bytes()
    generate_synthetic_idrid(root, **{**SMALL, "num_train": 5, "seed": 4})
    manifest = json.loads((root / SYNTHETIC_MANIFEST).read_text())
    assert manifest["params"]["seed"] == 4 and manifest["params"]["num_train"] == 5
    assert not (root / TRAIN_DIR / "IDRiD_006.jpg").exists(), "stale images must go"
    assert len(_read_csv(root / TRAIN_CSV)) == 1 + 5
    assert (root / TRAIN_DIR / "IDRiD_001.jpg").read_bytes() != old_image
    assert (root / "notes.txt").exists(), "only the generator's own files are replaced"
    assert not list(tmp_path.glob(".ds.*")), "no temp or trash folders left behind"


def test_rebuilds_when_a_file_is_missing(tmp_path):
    root = generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    (root / TEST_DIR / "IDRiD_002.jpg").unlink()
    generate_synthetic_idrid(root, **SMALL)
    assert (root / TEST_DIR / "IDRiD_002.jpg").is_file()


def test_refuses_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "idrid"
    (root / GRADING).mkdir(parents=True)  # e.g. the real IDRiD archive
    (root / "readme.txt").write_text("real data")
    with pytest.raises(ValueError, match=r"not a VisionCare synthetic dataset.*data\.root"):
        generate_synthetic_idrid(root, **SMALL)
    assert (root / "readme.txt").read_text() == "real data"
    assert not (root / SYNTHETIC_MANIFEST).exists()


def test_fills_an_existing_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    root = generate_synthetic_idrid(tmp_path / "empty", **SMALL)
    assert (root / SYNTHETIC_MANIFEST).is_file()


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []
    real_job = writer._render_job

    def flaky_job(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through rendering
        real_job(job)

    monkeypatch.setattr(writer, "_render_job", flaky_job)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.glob(".ds.tmp-*"))
    monkeypatch.undo()
    root = generate_synthetic_idrid(tmp_path / "ds", **SMALL)
    assert len(list((root / TRAIN_DIR).iterdir())) == 6


@pytest.mark.parametrize(
    "bad", [{"num_train": 0}, {"num_test": -1}, {"image_size": 32}, {"seed": -1}]
)
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_synthetic_idrid(tmp_path / "ds", **{**SMALL, **bad})
