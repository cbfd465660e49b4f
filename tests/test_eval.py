"""`src/eval.py` / `evaluate`: metrics.json re-checked by hand from predictions.csv.

One tiny checkpoint (model=tiny, one epoch) is trained once for the module; each metric is then
re-computed here with plain numpy from predictions.csv, so a wrong wiring of torchmetrics (an
ignored -1, a micro/macro mix-up, a flipped ROC) cannot hide behind the same library.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from tests.conftest import CONF, ROOT, SYNTHETIC_OVERRIDES
from visioncare.data.transforms import build_eval_transform
from visioncare.errors import ConfigurationError
from visioncare.scoring.report import _fmt_ci, compute_metrics
from visioncare.serving.loading import input_spec, load_model
from visioncare.serving.probabilities import collect_probabilities
from visioncare.tasks.evaluate import build_datamodule
from visioncare.tasks.evaluate import run as evaluate
from visioncare.tasks.predict import run as run_predict

TASKS = {"dr": 5, "dme": 3}
REFERABLE_FROM = {"dr": 2, "dme": 1}


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    """best.ckpt of a one-epoch `model=tiny` run on the small synthetic set."""
    return tiny_checkpoint


@pytest.fixture
def eval_cfg(tmp_path: Path, cache_dir: Path, ckpt: Path) -> Callable[..., DictConfig]:
    """conf/eval.yaml for the shared checkpoint; the run dir is tmp_path/run. No `model=`."""

    def _make(*extra: str) -> DictConfig:
        cfg = _compose(
            "eval",
            [
                f"ckpt_path={ckpt}",
                f"paths.cache_dir={cache_dir}",
                f"paths.log_dir={tmp_path / 'logs'}",
                "num_workers=0",
                "batch_size=8",
                *extra,
            ],
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    return _make


def _read_predictions(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    text = ("dataset", "image", "source", "patient", "laterality", "site")
    out = {k: np.array(v) for k, v in columns.items() if k in text}
    for key, values in columns.items():
        if key not in out:
            out[key] = np.array([float(v) for v in values])
    return out


# ------------------------------------------------------------------ independent computations
def _confusion(y: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=int)
    for t, q in zip(y, p, strict=True):
        matrix[int(t), int(q)] += 1
    return matrix


def _macro_f1(m: np.ndarray) -> float:
    """Mean F1 over the grades that occur in labels or predictions (torchmetrics' convention)."""
    tp = np.diag(m).astype(float)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean())


def _qwk(m: np.ndarray) -> float:
    n = m.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    weights = (i - j) ** 2 / (n - 1) ** 2
    expected = np.outer(m.sum(1), m.sum(0)) / m.sum()
    denominator = (weights * expected).sum()
    return 0.0 if denominator == 0 else float(1 - (weights * m).sum() / denominator)


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney: mean rank of the positives (ties get their average rank)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = int(truth.sum()), int((1 - truth).sum())
    return float((ranks[truth == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _close(actual: float | None, expected: float | None, tol: float = 1e-5) -> bool:
    if expected is None or actual is None:
        return actual is expected
    return abs(actual - expected) <= tol


def _check_against_hand(
    metrics: dict, pred: dict[str, np.ndarray], prefix: str, full: bool = True
) -> None:
    """Every metric of ``prefix`` against numpy; ``full`` adds referable and ECE metrics."""
    accs, both = [], None
    for task, n in TASKS.items():
        y, p = pred[f"{task}_true"].astype(int), pred[f"{task}_pred"].astype(int)
        probs = np.stack([pred[f"{task}_prob_{k}"] for k in range(n)], axis=1)
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
        assert (probs.argmax(1) == p).all()
        keep = y >= 0
        right = (y == p) | ~keep
        both = right if both is None else both & right
        y, p, probs = y[keep], p[keep], probs[keep]
        if not keep.any():  # a task without labels: everything undefined
            assert metrics[f"{prefix}/acc_{task}"] is None
            assert metrics[f"{prefix}/confusion_{task}"] is None
            if full:
                assert metrics[f"{prefix}/referable_{task}_auroc"] is None
                assert metrics[f"{prefix}/ece_{task}"] is None
            continue
        m = _confusion(y, p, n)
        assert metrics[f"{prefix}/confusion_{task}"] == m.tolist()
        assert _close(metrics[f"{prefix}/acc_{task}"], float((y == p).mean()))
        accs.append(float((y == p).mean()))
        assert _close(metrics[f"{prefix}/f1_{task}"], _macro_f1(m))
        assert _close(metrics[f"{prefix}/qwk_{task}"], _qwk(m), 1e-4)
        for k in range(n):
            support = int((y == k).sum())
            expected = float(((p == k) & (y == k)).sum() / support) if support else None
            assert _close(metrics[f"{prefix}/per_class_acc_{task}_{k}"], expected)
        if not full:
            continue
        truth = (y >= REFERABLE_FROM[task]).astype(int)
        # One definition of "referable" everywhere: P(referable) >= the operating threshold.
        threshold = metrics[f"{prefix}/referable_{task}_threshold"]
        decision = (probs[:, REFERABLE_FROM[task] :].sum(1) >= threshold).astype(int)
        pos, neg = int(truth.sum()), int((1 - truth).sum())
        sens = float((decision[truth == 1]).mean()) if pos else None
        spec = float((1 - decision[truth == 0]).mean()) if neg else None
        auroc = _auroc(truth, probs[:, REFERABLE_FROM[task] :].sum(1)) if pos and neg else None
        assert _close(metrics[f"{prefix}/referable_{task}_sensitivity"], sens)
        assert _close(metrics[f"{prefix}/referable_{task}_specificity"], spec)
        assert _close(metrics[f"{prefix}/referable_{task}_auroc"], auroc, 1e-4)
        # ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin size.
        confidence = probs.max(1)
        bins = np.clip(np.ceil(confidence * 15) - 1, 0, 14).astype(int)
        ece = sum(
            abs((p[bins == b] == y[bins == b]).mean() - confidence[bins == b].mean())
            * (bins == b).mean()
            for b in range(15)
            if (bins == b).any()
        )
        assert _close(metrics[f"{prefix}/ece_{task}"], float(ece), 1e-4)
    labelled_all = (pred["dr_true"] >= 0) & (pred["dme_true"] >= 0)
    joint = float(both[labelled_all].mean()) if labelled_all.any() else None
    assert _close(metrics[f"{prefix}/joint_acc"], joint)
    assert _close(metrics[f"{prefix}/avg_acc"], float(np.mean(accs)) if accs else None)


def test_compute_metrics_partial_labels_and_sources():
    """Random probabilities, -1 labels and two sources (one without DME grades) vs numpy."""
    rng = np.random.default_rng(0)
    n = 120
    probs = {
        t: torch.softmax(torch.tensor(rng.normal(0, 2, (n, c))), 1).float()
        for t, c in TASKS.items()
    }
    targets = {t: torch.tensor(rng.integers(0, c, n)) for t, c in TASKS.items()}
    targets["dr"][rng.random(n) < 0.2] = -1
    sources = torch.tensor((np.arange(n) % 2).astype(int))
    targets["dme"][sources == 1] = -1  # e.g. APTOS: DR grades only
    thresholds = {"dr": 0.3, "dme": 0.6}
    metrics = compute_metrics(probs, targets, sources, ["idrid", "aptos"], "test", thresholds)
    assert metrics["test/referable_dr_threshold"] == 0.3
    json.dumps(metrics)  # plain JSON values only (None, not NaN)

    def arrays(mask: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for task, c in TASKS.items():
            out[f"{task}_true"] = targets[task].numpy()[mask]
            out[f"{task}_pred"] = probs[task].argmax(1).numpy()[mask]
            for k in range(c):
                out[f"{task}_prob_{k}"] = probs[task][:, k].numpy().astype(float)[mask]
        return out

    everything = np.ones(n, dtype=bool)
    _check_against_hand(metrics, arrays(everything), "test")
    for index, name in enumerate(["idrid", "aptos"]):
        _check_against_hand(metrics, arrays(sources.numpy() == index), f"test/{name}", full=False)
    assert metrics["test/aptos/acc_dme"] is None and metrics["test/idrid/acc_dme"] is not None


def _check_calibration(metrics: dict, pred: dict[str, np.ndarray], prefix: str) -> None:
    """NLL, Brier and ECE, calibrated (the `prob` columns) and raw (`_uncalibrated` columns),
    recomputed from predictions.csv; each with an interval around it."""
    for task, n in TASKS.items():
        labelled = pred[f"{task}_true"] >= 0
        y = pred[f"{task}_true"][labelled].astype(int)
        for suffix in ("", "_uncalibrated"):
            probs = np.stack([pred[f"{task}_prob_{k}{suffix}"] for k in range(n)], 1)[labelled]
            nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
            brier = float(((probs - np.eye(n)[y]) ** 2).sum(1).mean())
            confidence, right = probs.max(1), probs.argmax(1) == y
            bins = np.minimum((confidence * 15).astype(int), 15)
            ece = sum(
                abs(right[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                for b in range(16)
                if (bins == b).any()
            )
            for name, value in (("nll", nll), ("brier", brier), ("ece", float(ece))):
                key = f"{prefix}/{name}_{task}{suffix}"
                assert _close(metrics[key], value, 1e-4), key
                low, high = metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]
                assert low <= metrics[key] + 1e-9 and metrics[key] - 1e-9 <= high, key


# ------------------------------------------------------------------ tests
@pytest.mark.slow
def test_metrics_match_independent_computation(eval_cfg):
    cfg = eval_cfg()
    returned = evaluate(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    pred = _read_predictions(run / "predictions.csv")
    assert len(pred["image"]) == 16  # data.num_test of the checkpoint's own (stored) config

    for task, n in TASKS.items():
        for key in ("acc", "f1", "qwk", "ece", "num", "confusion"):
            assert f"test/{key}_{task}" in metrics
        for m in ("sensitivity", "specificity", "auroc"):
            assert f"test/referable_{task}_{m}" in metrics
        assert all(f"test/per_class_acc_{task}_{k}" in metrics for k in range(n))
    assert "test/joint_acc" in metrics and "test/avg_acc" in metrics
    assert returned["test/acc_dr"] == pytest.approx(metrics["test/acc_dr"])

    _check_against_hand(metrics, pred, "test")
    _check_calibration(metrics, pred, "test")

    # The checkpoint's validation operating point is the one eval applies and reports.
    stored = torch.load(cfg.ckpt_path, weights_only=True)["visioncare_operating_points"]
    assert metrics["test/referable_dr_threshold"] == pytest.approx(stored["dr"]["threshold"])
    # Every headline metric has a bootstrap interval around its value.
    for name in ("avg_acc", "joint_acc", "acc_dr", "f1_dme", "qwk_dr", "referable_dr_auroc"):
        value, low, high = (metrics[f"test/{name}{s}"] for s in ("", "_ci_low", "_ci_high"))
        if value is not None:
            assert low <= value + 1e-9 and value - 1e-9 <= high, name
    report = (run / "report.md").read_text()
    assert f"{metrics['test/acc_dr']:.4f} [{metrics['test/acc_dr_ci_low']:.4f}, " in report

    # The gradable subset: its count, as a grouping too, and its metrics recomputed by hand
    # from the rows predict.py's rule keeps (every synthetic photo is gradable here).
    from visioncare.data.preprocess import gradable_flags
    from visioncare.data.quality import QualityThresholds

    spec = input_spec(load_model(cfg.ckpt_path)[0])
    flags = gradable_flags(pred["image"], spec.preprocess, QualityThresholds())
    assert metrics["test/gradable/num"] == sum(flags)
    assert metrics.get("test/group/gradable=true/num", 0) == sum(flags)
    assert metrics.get("test/group/gradable=false/num", 0) == len(flags) - sum(flags)
    if all(flags):
        for name in ("acc_dr", "acc_dme", "joint_acc", "qwk_dr"):
            assert metrics[f"test/gradable/{name}"] == pytest.approx(metrics[f"test/{name}"])
    assert "Gradable photos only" in report

    assert (run / "report.md").read_text().count("|") > 20
    assert "test_efficientnet" in (run / "report.md").read_text()  # trained with model=tiny
    assert (run / "plots" / "confusion_dr.png").is_file()
    assert (run / "plots" / "confusion_dme.png").is_file()
    for task in TASKS:
        roc = run / "plots" / f"roc_referable_{task}.png"
        assert roc.is_file() == (metrics[f"test/referable_{task}_auroc"] is not None)


def _rows_of(pred: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in pred.items()}


@pytest.mark.slow
def test_external_validation_on_two_difficulty_presets(eval_cfg, tmp_path):
    """A model trained on the standard synthetic set, evaluated in one call on its own test split
    and on the moderate and hard presets (a domain shift): every dataset's keys with intervals,
    one report table with all rows, and every number re-computed from its predictions.csv rows."""
    presets = {"moderate": "moderate", "hard": "hard"}
    extra = ["subgroups.min_size=5", "bootstrap.resamples=200"]
    for name, difficulty in presets.items():
        extra += [
            f"+data@datasets.{name}=synthetic",
            f"datasets.{name}.difficulty={difficulty}",
            f"datasets.{name}.root={tmp_path / name}",
            *(o.replace("data.", f"datasets.{name}.") for o in SYNTHETIC_OVERRIDES),
        ]
    cfg = eval_cfg(*extra)
    evaluate(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    pred = _read_predictions(run / "predictions.csv")
    assert sorted(set(pred["dataset"])) == ["hard", "moderate", "own"]
    report = (run / "report.md").read_text()
    table = report.split("## External validation", 1)[1].split("\n## ", 1)[0]
    headline = ("acc_dr", "qwk_dr", "acc_dme", "referable_dr_auroc", "ece_dr")
    for name, prefix in (("own", "test"), ("moderate", "moderate/test"), ("hard", "hard/test")):
        rows = _rows_of(pred, pred["dataset"] == name)
        assert len(rows["image"]) == 16
        _check_against_hand(metrics, rows, prefix)
        _check_calibration(metrics, rows, prefix)
        cells = [_fmt_ci(metrics, f"{prefix}/{m}") for m in headline if metrics[f"{prefix}/{m}"]]
        line = next(x for x in table.splitlines() if x.startswith(f"| {name} | 16 |"))
        assert all(cell in line for cell in cells), (line, cells)
        for m in ("acc_dr", "qwk_dr", "ece_dr"):
            low, high = metrics[f"{prefix}/{m}_ci_low"], metrics[f"{prefix}/{m}_ci_high"]
            assert low - 1e-9 <= metrics[f"{prefix}/{m}"] <= high + 1e-9
        # The source subgroup holds every row of its dataset (min_size=5 gives it metrics).
        group = f"{prefix}/group/source=synthetic"
        assert metrics[f"{group}/num"] == 16
        assert metrics[f"{group}/acc_dr"] == pytest.approx(metrics[f"{prefix}/acc_dr"])
        if name == "own":
            continue
        for m in ("acc_dr", "qwk_dr", "ece_dr"):
            diff = metrics[f"{prefix}/diff/{m}"]
            assert diff == pytest.approx(metrics[f"{prefix}/{m}"] - metrics[f"test/{m}"])
            assert metrics[f"{prefix}/diff/{m}_ci_low"] <= diff + 1e-9
            assert diff - 1e-9 <= metrics[f"{prefix}/diff/{m}_ci_high"]
        assert f"| {name} − own | {_fmt_ci(metrics, f'{prefix}/diff/acc_dr')} |" in table


@pytest.mark.slow
def test_group_columns_reach_metrics_and_predictions(eval_cfg, tmp_path):
    """A CSV dataset with a `site` column, evaluated as an external dataset: predictions.csv
    carries the column and each site's metrics equal a recomputation from its rows."""
    own = tmp_path / "own"
    evaluate(eval_cfg())
    shutil.move(tmp_path / "run", own)
    scored = _read_predictions(own / "predictions.csv")
    lines = ["image,dr,dme,split,site"]
    for i, image in enumerate(scored["image"]):
        dr, dme = int(scored["dr_true"][i]), int(scored["dme_true"][i])
        lines.append(f"{image},{dr},{dme},test,{'north' if i % 2 else 'south'}")
    # Every dataset needs a training split (validate_records), even one evaluated only.
    train_image = next(Path(scored["image"][0]).parents[1].glob("a. Training Set/*.jpg"))
    lines.append(f"{train_image},0,0,train,south")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    cfg = eval_cfg(
        "+data@datasets.clinic=csv",
        f"datasets.clinic.root={tmp_path}",
        "datasets.clinic.split_column=split",
        "datasets.clinic.group_columns=[site]",
        "subgroups.min_size=8",
        "bootstrap.resamples=100",
    )
    evaluate(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    pred = _read_predictions(run / "predictions.csv")
    for site in ("north", "south"):
        rows = _rows_of(pred, (pred["dataset"] == "clinic") & (pred["site"] == f"{site}"))
        prefix = f"clinic/test/group/site={site}"
        assert metrics[f"{prefix}/num"] == len(rows["image"]) == 8
        y, p = rows["dr_true"].astype(int), rows["dr_pred"].astype(int)
        assert metrics[f"{prefix}/acc_dr"] == pytest.approx(float((y == p).mean()))
        assert metrics[f"{prefix}/qwk_dr"] == pytest.approx(_qwk(_confusion(y, p, 5)), abs=1e-4)
        assert metrics[f"{prefix}/acc_dr_ci_low"] <= metrics[f"{prefix}/acc_dr"] + 1e-9
    assert "| site=north | 8 |" not in (run / "report.md").read_text()  # own data's subgroups only


@pytest.mark.slow
def test_an_external_dataset_with_an_empty_split_is_one_error(eval_cfg, synthetic_root, tmp_path):
    """split=val on a dataset that holds out no validation: an error naming the dataset and its
    split sizes, not torch.cat's traceback from an empty loader."""
    images = sorted(Path(synthetic_root).glob("**/a. Training Set/*.jpg"))[:4]
    rows = [f"{image},0,0,{'test' if i == 0 else 'train'}" for i, image in enumerate(images)]
    (tmp_path / "labels.csv").write_text("image,dr,dme,split\n" + "\n".join(rows) + "\n")
    cfg = eval_cfg(
        "split=val",
        "+data@datasets.clinic=csv",
        f"datasets.clinic.root={tmp_path}",
        "datasets.clinic.split_column=split",
        "datasets.clinic.val_fraction=0.0",
    )
    with pytest.raises(ConfigurationError, match=r"split='val'.*'csv' \(clinic\) has no images"):
        evaluate(cfg)


@pytest.mark.slow
def test_tta_changes_probabilities_keeps_keys(eval_cfg, tmp_path):
    plain_cfg = eval_cfg()
    evaluate(plain_cfg)
    run = Path(plain_cfg.paths.output_dir)
    plain = json.loads((run / "metrics.json").read_text())
    plain_pred = _read_predictions(run / "predictions.csv")
    tta_cfg = eval_cfg("tta=true")
    with open_dict(tta_cfg):
        tta_cfg.paths.output_dir = str(tmp_path / "tta")
    evaluate(tta_cfg)
    tta = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    tta_pred = _read_predictions(tmp_path / "tta" / "predictions.csv")
    assert set(tta) == set(plain)
    assert (tta_pred["image"] == plain_pred["image"]).all()
    # The network's own outputs change (the raw softmax: the tiny model's fitted temperature
    # flattens its calibrated probabilities to within 1e-7 of uniform).
    raw = "dr_prob_0_uncalibrated"
    assert not np.allclose(tta_pred[raw], plain_pred[raw], atol=1e-7)


@pytest.mark.slow
def test_data_override_keeps_checkpoint_preprocessing(eval_cfg, synthetic_root, tmp_path):
    """data=synthetic says image_size=128; the checkpoint's 64 px input must win."""
    cfg = eval_cfg("data=synthetic", f"data.root={synthetic_root}", *SYNTHETIC_OVERRIDES)
    assert cfg.data.image_size == 128
    evaluate(cfg)
    report = (Path(cfg.paths.output_dir) / "report.md").read_text()
    assert "64 px, cache 72 px" in report


def test_absent_ckpt_path_is_a_configuration_error(eval_cfg, tmp_path):
    absent = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigurationError, match=r"nope\.ckpt"):
        evaluate(eval_cfg(f"ckpt_path={absent}"))


@pytest.mark.slow
def test_cli_missing_ckpt_path_and_real_run(ckpt: Path, cache_dir: Path, tmp_path: Path):
    env = {**os.environ, "VISIONCARE_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
    log_dir = tmp_path / "logs"
    base = [sys.executable, str(ROOT / "src" / "eval.py"), f"paths.log_dir={log_dir}"]
    missing = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2, missing.stderr
    assert "ckpt_path" in missing.stderr and "Traceback" not in missing.stderr

    args = [f"ckpt_path={ckpt}", f"paths.cache_dir={cache_dir}", "num_workers=0"]
    result = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = list((log_dir / "eval" / "runs").glob("*/metrics.json"))
    assert len(found) == 1
    assert "test/qwk_dr" in json.loads(found[0].read_text())
    assert (found[0].parent / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_predict_csv_equals_what_eval_scores(eval_cfg, ckpt, tmp_path):
    """predict.py on the test images gives exactly the probabilities eval.py scored."""
    evaluate(eval_cfg())
    scored = _read_predictions(tmp_path / "run" / "predictions.csv")
    listing = tmp_path / "test_images.csv"
    listing.write_text("image\n" + "\n".join(str(p) for p in scored["image"]) + "\n")
    cfg = _compose(
        "predict",
        [
            f"ckpt_path={ckpt}", f"input={listing}", "num_workers=0", "device=cpu",
            f"paths.log_dir={tmp_path / 'plogs'}",
        ],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "prun")
    run_predict(cfg)
    with open(tmp_path / "prun" / "predictions.csv", newline="") as handle:
        rows = {str(Path(r["image"]).resolve()): r for r in csv.DictReader(handle)}
    assert all(r["error"] == "" for r in rows.values())
    probs = [f"dr_prob_{k}" for k in range(5)] + [f"dme_prob_{k}" for k in range(3)]
    for i, image in enumerate(scored["image"]):
        row = rows[str(Path(image).resolve())]
        got = np.array([float(row[c]) for c in probs])
        np.testing.assert_allclose(got, [scored[c][i] for c in probs], atol=1e-5)
        assert int(row["dr_grade"]) == scored["dr_pred"][i]


@torch.no_grad()
def _plain_loop_probabilities(
    model: torch.nn.Module, loader: DataLoader, tta: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The inference loop eval ran before `trainer.predict`: the reference it must still equal."""
    probs, targets, sources = {t: [] for t in TASKS}, {t: [] for t in TASKS}, []
    for batch in loader:
        images = batch["image"]
        views = [images, images.flip(3), images.flip(2)] if tta else [images]
        summed: dict[str, torch.Tensor] = {}
        for view in views:
            logits = model(view)
            for task in TASKS:
                p = logits[task].float().softmax(dim=1)
                summed[task] = summed[task] + p if task in summed else p
        for task in TASKS:
            probs[task].append(summed[task] / len(views))
            targets[task].append(batch[task])
        sources.append(torch.as_tensor(batch["source"]))
    return (
        {t: torch.cat(v) for t, v in probs.items()},
        {t: torch.cat(v) for t, v in targets.items()},
        torch.cat(sources),
    )


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_trainer_predict_probabilities_equal_the_plain_loop(eval_cfg, ckpt, tta):
    """`collect_probabilities` (`predict_step` through `trainer.predict`) gives the plain loop's
    probabilities, labels and sources, in the same order, bit for bit."""
    model, config = load_model(ckpt, "cpu")
    spec = input_spec(model)
    datamodule = build_datamodule(eval_cfg(), config, spec)
    datamodule.prepare_data()
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    dataset.transform = build_eval_transform(spec.image_size, spec.mean, spec.std)
    loader = DataLoader(dataset, batch_size=5, shuffle=False)  # 16 images: a short last batch
    probs, targets, sources = collect_probabilities(model, loader, "cpu", tta=tta)
    expected_probs, expected_targets, expected_sources = _plain_loop_probabilities(
        model, loader, tta
    )
    assert not model.training
    assert torch.equal(sources, expected_sources)
    for task, n in TASKS.items():
        assert probs[task].shape == (len(dataset), n) and probs[task].dtype == torch.float32
        assert torch.equal(targets[task], expected_targets[task])
        difference = float((probs[task] - expected_probs[task]).abs().max())
        print(f"tta={tta} {task}: max |trainer.predict - plain loop| = {difference:.3g}")
        assert difference == 0.0


@pytest.mark.slow
def test_stored_temperatures_calibrate_reported_probabilities(eval_cfg, monkeypatch):
    """With temperatures on the model, predictions.csv's prob columns are the calibrated ones,
    the raw ones sit beside them, and every calibration measure recomputes from the file."""
    from visioncare.tasks import evaluate as task

    def with_temperatures(*args, **kwargs):
        model, config = load_model(*args, **kwargs)
        model.temperatures = {"dr": 2.0, "dme": 0.5}
        return model, config

    monkeypatch.setattr(task, "load_model", with_temperatures)
    cfg = eval_cfg()
    evaluate(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    pred = _read_predictions(run / "predictions.csv")
    assert not np.allclose(pred["dr_prob_0"], pred["dr_prob_0_uncalibrated"])
    assert metrics["test/nll_dr"] != pytest.approx(metrics["test/nll_dr_uncalibrated"])
    _check_against_hand(metrics, pred, "test")
    _check_calibration(metrics, pred, "test")
    assert "nll_dr_uncalibrated" in (run / "report.md").read_text()
    # 16 test images: below subgroups.min_size (20), so the source group has its count only.
    assert metrics["test/group/source=synthetic/num"] == 16
    assert "## Subgroups" in (run / "report.md").read_text()
