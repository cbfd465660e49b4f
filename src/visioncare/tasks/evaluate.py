"""The evaluation task behind `src/eval.py`: one checkpoint, one split, a full report.

The model and its preprocessing are rebuilt from the checkpoint alone (`load_model`,
`input_spec`), never from today's config defaults. The data is the checkpoint's own stored data
config unless `data=<name>` is given; either way image size, cache size, crop and normalisation
come from the checkpoint, because the network only understands the inputs it was trained on.

Written to the run directory (`paths.output_dir`):

- `metrics.json`: flat keys. Per task (`dr`, `dme`): `test/acc_{t}`, `test/f1_{t}` (macro),
  `test/qwk_{t}`, `test/per_class_acc_{t}_{k}` (recall of grade k; null for a grade absent from
  the labels), `test/num_{t}`, `test/confusion_{t}` (rows = true grade), `test/ece_{t}` (15-bin
  expected calibration error); `test/avg_acc`, `test/joint_acc`; referable DR (grade >= 2) and
  referable DME (grade >= 1): `test/referable_{t}_sensitivity`, `_specificity` of the decision
  P(referable) >= `test/referable_{t}_threshold` (the operating point chosen on validation and
  stored in the checkpoint, see `visioncare.scoring.referral`; 0.5 for a checkpoint without one) and
  `_auroc` (P(referable) = the summed softmax of the referable grades). With several sources, the
  per-task metrics again as `test/<source>/...`. When records carry patient ids, the headline
  metrics again per patient as `test/patient/...` (a patient's grade is the worse eye's; see
  `visioncare.scoring.bootstrap`) with `test/patient/num_patients`. A value that is undefined (no
  labels for the task, a single class for AUROC) is null. The prefix is the split's name
  (`val/...`). Calibration per task: `test/nll_{t}`, `test/brier_{t}` (squared error summed over
  grades) and `test/ece_{t}` on the calibrated probabilities (the model's stored
  `temperatures`; none stored: a warning, and calibrated = raw), and the same with
  `_uncalibrated` on the raw softmax. Subgroups (source dataset; laterality where known):
  `test/group/<column>=<value>/num` always, and every metric with an interval when the group
  has at least `subgroups.min_size` images.
- Bootstrap 95 % intervals (`bootstrap.resamples` draws, seeded by `bootstrap.seed`, patients
  resampled where known) of every headline and calibration metric as `<key>_ci_low` /
  `<key>_ci_high`. Point values and intervals come from one function
  (`visioncare.scoring.bootstrap.weighted_metrics`).
- `predictions.csv`: one row per image (patient id where known, true and predicted grades, the
  calibrated probabilities `{t}_prob_{k}` and the raw `{t}_prob_{k}_uncalibrated`), so every
  number above can be re-computed independently.
- `report.md`, `plots/confusion_{t}.png`, `plots/reliability_{t}.png`,
  `plots/roc_referable_{t}.png` (also as images in a TensorBoard event file in the run directory,
  so `make tensorboard` shows them), and a printed table.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from visioncare import TASKS
from visioncare.data.datamodule import FundusDataModule
from visioncare.data.input_spec import InputSpec
from visioncare.data.preprocess import gradable_flags
from visioncare.data.quality import QualityThresholds
from visioncare.data.transforms import build_eval_transform
from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.runs.resume import resolve_ckpt_path
from visioncare.runs.splits import check_splits
from visioncare.scoring.bootstrap import (
    outcomes_from_probs,
)
from visioncare.scoring.calibration import calibrate
from visioncare.scoring.referral import (
    REFERABLE_FROM,
    threshold_for,
)
from visioncare.scoring.report import (
    _has_patients,
    compute_metrics,
    gradable_metrics,
    print_table,
    subgroup_metrics,
    uncalibrated_metrics,
    uncertainty_metrics,
    write_eval_plots,
    write_metrics_json,
    write_report,
    write_split_predictions,
)
from visioncare.serving.devices import resolve_device, trainer_device
from visioncare.serving.loading import input_spec, load_model
from visioncare.serving.probabilities import collect_probabilities
from visioncare.utils.tensorboard import write_png_images

log = logging.getLogger("visioncare")


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.ckpt_path` on `cfg.split`; write the report; return the scalar metrics."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigurationError(
            "ckpt_path is required: python src/eval.py ckpt_path=<run>/checkpoints/best.ckpt"
        )
    ckpt_path = resolve_ckpt_path(str(cfg.ckpt_path), Path(cfg.paths.log_dir, "train"))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    split = str(cfg.get("split", "test"))

    check_int_at_least(cfg.batch_size, "batch_size")
    check_int_at_least(cfg.num_workers, "num_workers", minimum=0)
    bootstrap = cfg.get("bootstrap") or {}
    resamples = check_int_at_least(bootstrap.get("resamples", 1000), "bootstrap.resamples")
    level = bootstrap.get("level", 0.95)
    if not isinstance(level, float) or not 0.0 < level < 1.0:
        raise ConfigurationError(
            f"bootstrap.level={level!r} is not allowed; give the intervals' coverage as a "
            "fraction in (0, 1), e.g. 0.95"
        )
    device = str(resolve_device(str(cfg.get("device", "auto"))))
    trainer_device(device)  # a device the Trainer cannot run on fails before any data work
    model, config = load_model(ckpt_path, device=device)
    spec = input_spec(model)
    datamodule = build_datamodule(cfg, config, spec)
    datamodule.prepare_data()
    datamodule.setup("test")
    # --- Data drift since training (visioncare.runs.splits): only on the checkpoint's own data.
    if cfg.get("data") is None:
        check_splits(Path(ckpt_path).resolve().parents[1], datamodule.splits)
    # ---
    if split not in datamodule.datasets:
        raise ConfigurationError(
            f"split={split!r}: dataset '{datamodule.source.name}' has the splits "
            f"{sorted(datamodule.datasets)}"
        )
    log.info(
        "Evaluating %s on %s/%s (%s)", ckpt_path, datamodule.source.name, split, datamodule.sizes()
    )

    dataset = datamodule.datasets[split]
    # Always the evaluation transform (the train split's own one augments).
    dataset.transform = build_eval_transform(spec.image_size, spec.mean, spec.std)
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=int(cfg.num_workers),
        pin_memory=device.startswith("cuda"),
    )
    probs, targets, source_ids = collect_probabilities(
        model, loader, device, tta=bool(cfg.get("tta", False)), progress=True
    )
    records = datamodule.splits[split]
    names = datamodule.source_names
    # Calibrated probabilities are what predict.py reports; the raw ones are kept for the
    # before/after calibration measures and predictions.csv.
    temperatures = getattr(model, "temperatures", None)
    if not temperatures:
        log.warning(
            "%s has no stored temperature; calibrated metrics equal the uncalibrated ones",
            ckpt_path,
        )
    raw_probs = probs
    probs = calibrate(raw_probs, temperatures)
    thresholds = {t: threshold_for(model.operating_points, t) for t in TASKS}
    if not model.operating_points:
        log.warning(
            "%s stores no operating point chosen on validation; referable decisions use "
            "P(referable) >= %s",
            ckpt_path,
            thresholds["dr"],
        )

    metrics = compute_metrics(probs, targets, source_ids, names, split, thresholds)
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in probs.items()},
        {t: v.numpy() for t, v in targets.items()},
        thresholds,
    )
    seed = int(bootstrap.get("seed", 0))
    metrics.update(
        uncertainty_metrics(
            outcomes, [r.group for r in records], split, resamples=resamples, seed=seed, level=level
        )
    )
    metrics.update(
        uncalibrated_metrics(
            raw_probs,
            targets,
            [r.group for r in records],
            split,
            resamples=resamples,
            seed=seed,
            level=level,
        )
    )
    min_size = check_int_at_least(
        (cfg.get("subgroups") or {}).get("min_size", 20), "subgroups.min_size", minimum=0
    )
    # The photos' gradable verdict, as predict.py judges it (the cache keeps pixels only).
    gradable = gradable_flags(
        [r.image for r in records],
        spec.preprocess,
        QualityThresholds.from_config(cfg.get("quality")),
        num_workers=max(1, int(cfg.num_workers)),
    )
    metrics.update(gradable_metrics(outcomes, records, gradable, split, resamples, seed, level))
    metrics.update(
        subgroup_metrics(
            outcomes,
            records,
            split,
            min_size=min_size,
            resamples=resamples,
            seed=seed,
            level=level,
            gradable=gradable,
        )
    )
    write_metrics_json(output_dir / "metrics.json", metrics)
    write_split_predictions(output_dir / "predictions.csv", records, probs, targets, raw_probs)
    plots = write_eval_plots(output_dir / "plots", metrics, probs, targets, split, raw_probs)
    write_png_images(output_dir, plots, split)  # TensorBoard's IMAGES tab
    write_report(
        output_dir / "report.md",
        metrics,
        split,
        {
            "checkpoint": str(Path(ckpt_path).resolve()),
            "backbone": str(model.hparams.get("backbone")),
            "dataset": f"{datamodule.source.name} ({', '.join(names)})",
            "split": f"{split} ({len(records)} images)",
            "data sizes": ", ".join(f"{k}={v}" for k, v in datamodule.sizes().items()),
            "input": f"{spec.image_size} px, cache {spec.preprocess.size} px, "
            f"crop_fundus={spec.preprocess.crop_fundus}",
            "tta": "identity + hflip + vflip" if cfg.get("tta") else "off",
            "referable thresholds": ", ".join(
                f"{t.upper()} P(>= {REFERABLE_FROM[t]}) >= {thresholds[t]:.4f}" for t in TASKS
            )
            + ("" if model.operating_points else " (no validation operating point stored)"),
            "intervals": f"{bootstrap.get('level', 0.95):.0%} percentile bootstrap, "
            f"{bootstrap.get('resamples', 1000)} resamples of "
            + ("patients" if _has_patients(records) else "images"),
        },
        plots,
    )
    print_table(metrics, split)
    log.info("Evaluation written to %s", output_dir)
    return {
        k: float("nan") if v is None else float(v)
        for k, v in metrics.items()
        if v is None or isinstance(v, (int, float))
    }


def build_datamodule(cfg: DictConfig, config: dict, spec: InputSpec) -> FundusDataModule:
    """The checkpoint's own data config, or `cfg.data`, with the checkpoint's preprocessing.

    Batch size, workers and the cache folder are this machine's (the stored cache_dir may point
    at the training machine); preprocessing keys are the checkpoint's so the inputs match.
    """
    if cfg.get("data") is not None:
        data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    elif config.get("data"):
        data = OmegaConf.create(config["data"])
    else:
        raise ConfigurationError(
            "the checkpoint stores no data config; pass the dataset: data=<name> data.root=<dir>"
        )
    overrides = {
        "batch_size": int(cfg.batch_size),
        "num_workers": int(cfg.num_workers),
        "cache_dir": str(cfg.paths.cache_dir),
        "image_size": spec.image_size,
        "cache_size": spec.preprocess.size,
        "crop_fundus": spec.preprocess.crop_fundus,
        "ben_graham": spec.preprocess.ben_graham,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    for key, value in overrides.items():
        data[key] = value
    return instantiate(data)
