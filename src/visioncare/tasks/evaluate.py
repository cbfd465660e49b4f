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
  Subgroups also come from the data itself (`Record.groups`): `data.group_columns` of a CSV
  table and the DICOM `camera`.
- External validation (`datasets`: name → data config, `+data@datasets.<name>=<config>`): each
  dataset's split is evaluated the same way (the checkpoint's preprocessing and temperatures),
  every key above again as `<name>/<split>/...`, and `<name>/<split>/diff/<metric>` (with
  intervals) is its difference to the first row (the checkpoint's own data, or `data=`): an
  unpaired bootstrap, each dataset resampling its own patients. report.md opens with one table,
  a row per dataset (and per source of a multi-source dataset).
- `predictions.csv`: one row per image and dataset (`dataset` = `own`, `data=`'s source name or
  the `datasets` name; patient id and laterality where known; the data's group columns; true
  and predicted grades, the calibrated probabilities `{t}_prob_{k}` and the raw
  `{t}_prob_{k}_uncalibrated`), so every number above can be re-computed independently.
- `report.md`, `plots/confusion_{t}.png`, `plots/reliability_{t}.png`,
  `plots/roc_referable_{t}.png` (also as images in a TensorBoard event file in the run directory,
  so `make tensorboard` shows them), and a printed table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
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
from visioncare.scoring.bootstrap import Outcomes
from visioncare.scoring.calibration import calibrate
from visioncare.scoring.evaluation import IntervalSettings, score_split
from visioncare.scoring.referral import (
    REFERABLE_FROM,
    threshold_for,
)
from visioncare.scoring.report import (
    EvaluatedSplit,
    _has_patients,
    difference_metrics,
    print_table,
    validation_section,
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
    """Evaluate `cfg.ckpt_path` on `cfg.split` of its data and of every `cfg.datasets` entry;
    write the report; return the scalar metrics."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigurationError(
            "ckpt_path is required: python src/eval.py ckpt_path=<run>/checkpoints/best.ckpt"
        )
    ckpt_path = resolve_ckpt_path(str(cfg.ckpt_path), Path(cfg.paths.log_dir, "train"))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    split = str(cfg.get("split", "test"))
    external = external_datasets(cfg)

    check_int_at_least(cfg.batch_size, "batch_size")
    check_int_at_least(cfg.num_workers, "num_workers", minimum=0)
    settings = IntervalSettings.from_config(cfg)
    device = str(resolve_device(str(cfg.get("device", "auto"))))
    trainer_device(device)  # a device the Trainer cannot run on fails before any data work
    model, config = load_model(ckpt_path, device=device)
    spec = input_spec(model)
    # Every dataset's config is instantiated (and so checked) before any image is read.
    datamodules = {name: datamodule_for(cfg, data, spec) for name, data in external.items()}
    datamodule = build_datamodule(cfg, config, spec)
    datamodule.prepare_data()
    datamodule.setup("test")
    # --- Data drift since training (visioncare.runs.splits): only on the checkpoint's own data.
    if cfg.get("data") is None:
        check_splits(Path(ckpt_path).resolve().parents[1], datamodule.splits)
    # ---
    temperatures = getattr(model, "temperatures", None)
    if not temperatures:
        log.warning(
            "%s has no stored temperature; calibrated metrics equal the uncalibrated ones",
            ckpt_path,
        )
    thresholds = {t: threshold_for(model.operating_points, t) for t in TASKS}
    if not model.operating_points:
        log.warning(
            "%s stores no operating point chosen on validation; referable decisions use "
            "P(referable) >= %s",
            ckpt_path,
            thresholds["dr"],
        )
    scoring = _Scoring(cfg, spec, thresholds, settings, device)
    own_name = "own" if cfg.get("data") is None else datamodule.source.name
    own = scoring.evaluate(model, datamodule, split, split, own_name)
    metrics = dict(own.metrics)
    parts = [own.part]
    rows = validation_rows(metrics, own, split)
    differences = []
    for name, other_module in datamodules.items():
        other_module.prepare_data()
        other_module.setup("test")
        prefix = f"{name}/{split}"
        other = scoring.evaluate(model, other_module, split, prefix, name)
        metrics.update(other.metrics)
        metrics.update(
            difference_metrics(
                own.outcomes,
                [r.group for r in own.part.records],
                other.outcomes,
                [r.group for r in other.part.records],
                f"{prefix}/diff",
                settings.resamples,
                settings.seed,
                settings.level,
            )
        )
        parts.append(other.part)
        rows += validation_rows(metrics, other, prefix)
        differences.append((f"{name} − {own_name}", f"{prefix}/diff"))
    sections = []
    if len(rows) > 1:
        note = (
            f"The {split} split of each dataset, evaluated with this checkpoint's preprocessing "
            f"and calibrated probabilities; keys `<dataset>/{split}/...` in metrics.json (the "
            f"first row: `{split}/...`; a dataset's sources: `.../group/source=<name>/...`). "
            "Intervals: percentile bootstrap of each dataset's own patients (images where "
            "unknown); differences: unpaired bootstrap, each dataset resampled independently."
        )
        sections = validation_section(metrics, rows, differences, note)

    write_metrics_json(output_dir / "metrics.json", metrics)
    write_split_predictions(output_dir / "predictions.csv", parts)
    plots = write_eval_plots(
        output_dir / "plots", metrics, own.part.probs, own.part.targets, split, own.raw_probs
    )
    write_png_images(output_dir, plots, split)  # TensorBoard's IMAGES tab
    records = own.part.records
    names = datamodule.source_names
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
            **{
                f"external: {name}": f"{dm.source.name}, {split} ({len(dm.splits[split])} images)"
                for name, dm in datamodules.items()
            },
            "input": f"{spec.image_size} px, cache {spec.preprocess.size} px, "
            f"crop_fundus={spec.preprocess.crop_fundus}",
            "tta": "identity + hflip + vflip" if cfg.get("tta") else "off",
            "referable thresholds": ", ".join(
                f"{t.upper()} P(>= {REFERABLE_FROM[t]}) >= {thresholds[t]:.4f}" for t in TASKS
            )
            + ("" if model.operating_points else " (no validation operating point stored)"),
            "intervals": f"{settings.level:.0%} percentile bootstrap, "
            f"{settings.resamples} resamples of "
            + ("patients" if _has_patients(records) else "images"),
        },
        plots,
        sections,
    )
    print_table(metrics, split)
    for name in datamodules:
        print_table(metrics, f"{name}/{split}")
    log.info("Evaluation written to %s", output_dir)
    return {
        k: float("nan") if v is None else float(v)
        for k, v in metrics.items()
        if v is None or isinstance(v, (int, float))
    }


# Dataset names that would read as a split or clash with the report's own key prefixes.
_RESERVED_NAMES = ("train", "val", "test", "own", "group", "patient", "gradable", "diff")


def external_datasets(cfg: DictConfig) -> dict[str, DictConfig]:
    """`cfg.datasets` (name → data config), checked before any work: each entry must be a data
    config (``+data@datasets.<name>=<config>``) under a name usable as a key prefix."""
    datasets = cfg.get("datasets")
    if datasets is None or (isinstance(datasets, DictConfig) and not datasets):
        return {}
    if not isinstance(datasets, DictConfig):
        raise ConfigurationError(
            f"datasets must map names to data configs, got {datasets!r}; add one with "
            "+data@datasets.<name>=<data config>, e.g. +data@datasets.aptos=aptos"
        )
    out: dict[str, DictConfig] = {}
    for name, data in datasets.items():
        name = str(name)
        if not name or "/" in name or "=" in name or name in _RESERVED_NAMES:
            raise ConfigurationError(
                f"datasets.{name}: a dataset name must be non-empty, without '/' or '=', and "
                f"none of {list(_RESERVED_NAMES)}"
            )
        if not isinstance(data, DictConfig) or "_target_" not in data:
            raise ConfigurationError(
                f"datasets.{name} is not a data config; add it with "
                f"+data@datasets.{name}=<data config> (e.g. synthetic, aptos, csv) and set its "
                f"keys as datasets.{name}.root=..."
            )
        out[name] = data
    return out


def validation_rows(
    metrics: dict, evaluated: _Evaluated, prefix: str
) -> list[tuple[str, str, int]]:
    """The validation table's rows of one dataset: itself, then each of its sources (from the
    source subgroups) when it has several (e.g. `data=combined`)."""
    name = evaluated.part.dataset
    rows = [(name, prefix, len(evaluated.part.records))]
    sources = sorted({r.source for r in evaluated.part.records})
    if len(sources) > 1:
        for source in sources:
            group = f"{prefix}/group/source={source}"
            rows.append((f"{name}: {source}", group, int(metrics[f"{group}/num"])))
    return rows


@dataclass
class _Evaluated:
    """One dataset's metrics, its predictions.csv rows, outcomes and raw probabilities."""

    metrics: dict[str, Any]
    part: EvaluatedSplit
    outcomes: Outcomes
    raw_probs: dict[str, Tensor]


@dataclass
class _Scoring:
    """What every evaluated dataset shares: the preprocessing, thresholds and bootstrap."""

    cfg: DictConfig
    spec: InputSpec
    thresholds: dict[str, float]
    settings: IntervalSettings
    device: str

    def evaluate(
        self,
        model: Any,
        datamodule: FundusDataModule,
        split: str,
        prefix: str,
        name: str,
    ) -> _Evaluated:
        """Probabilities of ``split`` (calibrated with the model's temperatures) and every
        metric of the report under the key prefix ``prefix``."""
        cfg, spec = self.cfg, self.spec
        if split not in datamodule.datasets:
            raise ConfigurationError(
                f"split={split!r}: dataset '{datamodule.source.name}' ({name}) has the splits "
                f"{sorted(datamodule.datasets)}"
            )
        log.info(
            "Evaluating %s/%s (%s): %s", datamodule.source.name, split, name, datamodule.sizes()
        )
        dataset = datamodule.datasets[split]
        if len(dataset) == 0:
            raise ConfigurationError(
                f"split={split!r} of dataset '{datamodule.source.name}' ({name}) has no images; "
                f"its splits hold {datamodule.sizes()}: evaluate another split or check the data"
            )
        # Always the evaluation transform (the train split's own one augments).
        dataset.transform = build_eval_transform(spec.image_size, spec.mean, spec.std)
        loader = DataLoader(
            dataset,
            batch_size=int(cfg.batch_size),
            shuffle=False,
            num_workers=int(cfg.num_workers),
            pin_memory=self.device.startswith("cuda"),
        )
        raw_probs, targets, source_ids = collect_probabilities(
            model, loader, self.device, tta=bool(cfg.get("tta", False)), progress=True
        )
        records = datamodule.splits[split]
        # Calibrated probabilities are what predict.py reports; the raw ones are kept for the
        # before/after calibration measures and predictions.csv.
        probs = calibrate(raw_probs, getattr(model, "temperatures", None))
        # The photos' gradable verdict, as predict.py judges it (the cache keeps pixels only).
        gradable = gradable_flags(
            [r.image for r in records],
            spec.preprocess,
            QualityThresholds.from_config(cfg.get("quality")),
            num_workers=max(1, int(cfg.num_workers)),
        )
        metrics, outcomes = score_split(
            probs,
            raw_probs,
            targets,
            source_ids,
            datamodule.source_names,
            records,
            prefix,
            self.thresholds,
            self.settings,
            gradable,
        )
        part = EvaluatedSplit(name, records, probs, targets, raw_probs)
        return _Evaluated(metrics, part, outcomes, raw_probs)


def _own_data_config(cfg: DictConfig, config: dict) -> DictConfig:
    """`cfg.data` when given, else the data config stored in the checkpoint."""
    if cfg.get("data") is not None:
        return cfg.data
    if config.get("data"):
        return OmegaConf.create(config["data"])
    raise ConfigurationError(
        "the checkpoint stores no data config; pass the dataset: data=<name> data.root=<dir>"
    )


def build_datamodule(cfg: DictConfig, config: dict, spec: InputSpec) -> FundusDataModule:
    """The checkpoint's own data config (its stored ``config``), or `cfg.data`, with the
    checkpoint's preprocessing."""
    return datamodule_for(cfg, _own_data_config(cfg, config), spec)


def datamodule_for(cfg: DictConfig, data: DictConfig, spec: InputSpec) -> FundusDataModule:
    """The datamodule of one data config with the checkpoint's preprocessing.

    Batch size, workers and the cache folder are this machine's (the stored cache_dir may point
    at the training machine); preprocessing keys are the checkpoint's so the inputs match.
    """
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
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
