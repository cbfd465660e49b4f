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
  stored in the checkpoint, see `visioncare.referral`; 0.5 for a checkpoint without one) and
  `_auroc` (P(referable) = the summed softmax of the referable grades). With several sources, the
  per-task metrics again as `test/<source>/...`. When records carry patient ids, the headline
  metrics again per patient as `test/patient/...` (a patient's grade is the worse eye's; see
  `visioncare.confidence`) with `test/patient/num_patients`. A value that is undefined (no labels
  for the task, a single class for AUROC) is null. The prefix is the split's name (`val/...`).
- Bootstrap 95 % intervals (`bootstrap.resamples` draws, seeded by `bootstrap.seed`, patients
  resampled where known) of every headline metric as `<key>_ci_low` / `<key>_ci_high`.
- `predictions.csv`: one row per image (patient id where known, true and predicted grades, all
  probabilities), so every number above can be re-computed independently.
- `report.md`, `plots/confusion_{t}.png`, `plots/roc_referable_{t}.png`, and a printed table.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryRecall,
    BinaryROC,
    BinarySpecificity,
    MulticlassCalibrationError,
)

from visioncare import IGNORE_INDEX, TASKS
from visioncare.confidence import (
    CI_METRICS,
    Outcomes,
    bootstrap_intervals,
    outcomes_from_probs,
    patient_outcomes,
    point_metrics,
)
from visioncare.data.datamodule import FundusDataModule
from visioncare.data.transforms import build_eval_transform
from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.inference import InputSpec, input_spec, load_model
from visioncare.metrics import MultiTaskMetrics
from visioncare.plots import plot_confusion_matrix, plot_roc
from visioncare.prediction import resolve_device
from visioncare.referral import REFERABLE_FROM, referable_score, referable_truth, threshold_for
from visioncare.utils.checkpoints import resolve_ckpt_path

log = logging.getLogger("visioncare")

ECE_BINS = 15
HEADLINE = ("avg_acc", "joint_acc", "acc_dr", "acc_dme", "f1_dr", "f1_dme", "qwk_dr", "qwk_dme")


def evaluate(cfg: DictConfig) -> dict[str, float]:
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
    thresholds = {t: threshold_for(model.operating_points, t) for t in TASKS}
    if not model.operating_points:
        log.warning(
            "%s stores no operating point chosen on validation; referable decisions use "
            "P(referable) >= %s",
            ckpt_path,
            thresholds["dr"],
        )

    metrics = compute_metrics(probs, targets, source_ids, names, split, thresholds)
    metrics.update(
        uncertainty_metrics(
            outcomes_from_probs(
                {t: p.numpy() for t, p in probs.items()},
                {t: v.numpy() for t, v in targets.items()},
                thresholds,
            ),
            [r.group for r in records],
            split,
            resamples=resamples,
            seed=int(bootstrap.get("seed", 0)),
            level=level,
        )
    )
    write_metrics_json(output_dir / "metrics.json", metrics)
    write_split_predictions(output_dir / "predictions.csv", records, probs, targets)
    plots = write_eval_plots(output_dir / "plots", metrics, probs, targets, split)
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


def collect_probabilities(
    model: L.LightningModule,
    loader: DataLoader,
    device: str | torch.device,
    tta: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Softmax probabilities per task (N, C), labels per task (N,) and source ids (N,).

    The probabilities are the model's own `predict_step` run by `trainer.predict`, so eval scores
    exactly what the LightningModule computes. With ``tta`` they are the mean over identity,
    horizontal and vertical flips (fundus photographs have no canonical orientation, so every
    flip is a valid view). ``model`` is left on the device it was on.
    """
    batches = _LabelledViews(loader, tta)
    accelerator, devices = trainer_device(device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        callbacks=[RichProgressBar()] if progress else None,
        enable_model_summary=False,
        precision="32-true",
    )
    where = next(model.parameters()).device
    outputs = trainer.predict(model, dataloaders=batches)
    model.to(where)  # Lightning's teardown moves the module to the CPU
    views = len(batches.views)
    probs = {}
    for task in TASKS:
        per_batch = []
        for start in range(0, len(outputs), views):
            summed = outputs[start][task]
            for output in outputs[start + 1 : start + views]:
                summed = summed + output[task]
            per_batch.append(summed / views)
        probs[task] = torch.cat(per_batch)
    return (
        probs,
        {t: torch.cat(v) for t, v in batches.targets.items()},
        torch.cat(batches.sources),
    )


def trainer_device(device: str | torch.device) -> tuple[str, int | list[int]]:
    """A torch device (`device=` of eval.py, a model's device) as the Trainer's accelerator and
    devices: ``cuda:1`` must stay GPU 1, which ``devices=1`` (the first GPU) would not be."""
    resolved = torch.device(device)
    if resolved.type == "cuda":
        return "cuda", 1 if resolved.index is None else [resolved.index]
    if resolved.type in ("cpu", "mps"):
        return resolved.type, 1
    raise ConfigurationError(
        f"device={device!s} is not supported for evaluation; use auto, cpu, cuda, cuda:N or mps"
    )


class _LabelledViews:
    """The loader's batches, each followed by its flipped views with ``tta``; keeps the labels.

    Every view of a batch is its own `predict_step` batch, so memory stays at one batch and the
    views reach the network exactly as the loader sized them. Labels and sources are kept here
    on the host, once per batch, as the batches pass.
    """

    def __init__(self, loader: DataLoader, tta: bool) -> None:
        self.loader = loader
        self.views: list[tuple[int, ...]] = [(), (3,), (2,)] if tta else [()]
        self.targets: dict[str, list[Tensor]] = {t: [] for t in TASKS}
        self.sources: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.loader) * len(self.views)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            for task in TASKS:
                self.targets[task].append(batch[task])
            self.sources.append(torch.as_tensor(batch["source"]))
            for dims in self.views:
                yield {**batch, "image": batch["image"].flip(dims)} if dims else batch


def compute_metrics(
    probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    source_ids: Tensor,
    source_names: list[str],
    split: str = "test",
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """All per-image point metrics of the report, flat; None where undefined (module docstring).

    ``thresholds``: task → operating threshold on P(referable) (default 0.5).
    """
    out: dict[str, Any] = _task_metrics(probs, targets, split)
    for task, num_classes in TASKS.items():
        target, prob = targets[task], probs[task]
        labelled = target != IGNORE_INDEX
        prefix = f"{split}/referable_{task}"
        threshold = threshold_for(None, task) if thresholds is None else thresholds[task]
        out.update(_referable_metrics(prob, target, task, threshold, prefix))
        ece = None
        if bool(labelled.any()):
            calibration = MulticlassCalibrationError(
                num_classes=num_classes, n_bins=ECE_BINS, norm="l1"
            )
            ece = float(calibration(prob[labelled], target[labelled]))
        out[f"{split}/ece_{task}"] = ece
    if len(source_names) > 1:
        for index, name in enumerate(source_names):
            mask = source_ids == index
            if bool(mask.any()):
                out.update(
                    _task_metrics(
                        {t: p[mask] for t, p in probs.items()},
                        {t: v[mask] for t, v in targets.items()},
                        f"{split}/{name}",
                    )
                )
    return out


def _task_metrics(
    probs: dict[str, Tensor], targets: dict[str, Tensor], prefix: str
) -> dict[str, Any]:
    """`MultiTaskMetrics` (the training metrics) plus confusion matrices, NaN → None.

    A grade with no labelled sample gets a per-class accuracy of None: torchmetrics reports 0
    for 0/0, which would read as "every such image was missed".
    """
    metrics = MultiTaskMetrics(prefix)
    metrics.update(probs, targets)
    out: dict[str, Any] = {k: _number(v) for k, v in metrics.compute().items()}
    for task, matrix in metrics.confusion_matrices().items():
        if matrix.sum() > 0:
            out[f"{prefix}/confusion_{task}"] = matrix.tolist()
            for k, support in enumerate(matrix.sum(dim=1).tolist()):
                if support == 0:
                    out[f"{prefix}/per_class_acc_{task}_{k}"] = None
        else:
            out[f"{prefix}/confusion_{task}"] = None
    return out


def uncertainty_metrics(
    outcomes: Outcomes,
    patients: list[str],
    split: str,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """Bootstrap intervals of the headline metrics; per-patient metrics where patients are known.

    ``patients``: each image's patient (`Record.group`: the image itself where unknown).
    """
    known = _shares_patients(patients)
    units = patients if known else None
    out: dict[str, Any] = {}
    for name, (low, high) in bootstrap_intervals(outcomes, units, resamples, seed, level).items():
        out[f"{split}/{name}_ci_low"], out[f"{split}/{name}_ci_high"] = low, high
    if known:
        per_patient, ids = patient_outcomes(outcomes, units)
        prefix = f"{split}/patient"
        out[f"{prefix}/num_patients"] = len(ids)
        for name, value in point_metrics(per_patient).items():
            out[f"{prefix}/{name}"] = value
        intervals = bootstrap_intervals(per_patient, None, resamples, seed, level)
        for name, (low, high) in intervals.items():
            out[f"{prefix}/{name}_ci_low"], out[f"{prefix}/{name}_ci_high"] = low, high
    return out


def _shares_patients(patients: list[str]) -> bool:
    """Whether some images share a patient (otherwise per-patient equals per-image)."""
    return len(set(patients)) < len(patients)


def _has_patients(records: list) -> bool:
    return _shares_patients([r.group for r in records])


def _referable_metrics(
    prob: Tensor, target: Tensor, task: str, threshold: float, prefix: str
) -> dict:
    """Sensitivity/specificity of P(referable) >= threshold; AUROC of P(referable)."""
    labelled = target != IGNORE_INDEX
    out: dict[str, Any] = {f"{prefix}_{m}": None for m in ("sensitivity", "specificity", "auroc")}
    out[f"{prefix}_threshold"] = threshold
    if not bool(labelled.any()):
        return out
    truth = referable_truth(target[labelled], task)
    score = referable_score(prob[labelled], task)
    decision = (score >= threshold).long()
    positives, negatives = int(truth.sum()), int((1 - truth).sum())
    if positives:
        out[f"{prefix}_sensitivity"] = float(BinaryRecall()(decision, truth))
    if negatives:
        out[f"{prefix}_specificity"] = float(BinarySpecificity()(decision, truth))
    if positives and negatives:
        out[f"{prefix}_auroc"] = float(BinaryAUROC()(score, truth))
    return out


def _number(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2))


def write_split_predictions(
    path: Path, records: list, probs: dict[str, Tensor], targets: dict[str, Tensor]
) -> None:
    """predictions.csv of the evaluated split: image, source, patient, true/predicted grades and
    every probability (the clinic CSV of predict.py is `prediction.write_predictions`)."""
    columns = ["image", "source", "patient", "dr_true", "dme_true", "dr_pred", "dme_pred"]
    columns += [f"{t}_prob_{k}" for t, n in TASKS.items() for k in range(n)]
    preds = {t: p.argmax(dim=1) for t, p in probs.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i, record in enumerate(records):
            row = [str(record.image), record.source, record.patient]
            row += [int(targets["dr"][i]), int(targets["dme"][i])]
            row += [int(preds["dr"][i]), int(preds["dme"][i])]
            row += [float(v) for t in TASKS for v in probs[t][i].tolist()]
            writer.writerow(row)


def write_eval_plots(
    plots: Path,
    metrics: dict[str, Any],
    probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    split: str,
) -> list[Path]:
    """Confusion matrix per task and the ROC curve of referable DR / DME."""
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for task, num_classes in TASKS.items():
        matrix = metrics.get(f"{split}/confusion_{task}")
        if matrix is not None:
            names = [f"{task.upper()} {k}" for k in range(num_classes)]
            target = plots / f"confusion_{task}.png"
            written.append(plot_confusion_matrix(matrix, f"{split} {task.upper()}", target, names))
        auroc = metrics.get(f"{split}/referable_{task}_auroc")
        if auroc is None:
            continue
        threshold = REFERABLE_FROM[task]
        labelled = targets[task] != IGNORE_INDEX
        truth = referable_truth(targets[task][labelled], task)
        score = referable_score(probs[task][labelled], task)
        fpr, tpr, _ = BinaryROC()(score, truth)
        title = f"Referable {task.upper()} (grade >= {threshold}), {split}"
        path = plots / f"roc_referable_{task}.png"
        written.append(plot_roc(fpr.numpy(), tpr.numpy(), auroc, title, path))
    return written


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_ci(metrics: dict[str, Any], key: str) -> str:
    """`value [low, high]` where the metric has a bootstrap interval, else the value alone."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    shown = _fmt(metrics.get(key))
    return shown if low is None or high is None else f"{shown} [{low:.4f}, {high:.4f}]"


def write_report(
    path: Path, metrics: dict[str, Any], split: str, facts: dict[str, str], plots: list[Path]
) -> None:
    """report.md: what was evaluated, then the metrics per task as Markdown tables."""
    lines = ["# VisionCare evaluation", ""]
    lines += [
        f"- **{k}**: `{v}`" if k == "checkpoint" else f"- **{k}**: {v}" for k, v in facts.items()
    ]
    header = ["| metric | value [95 % CI] |", "|---|---:|"]
    lines += ["", "## Overall", "", *header]
    for name in ("avg_acc", "joint_acc"):
        lines.append(f"| {name} | {_fmt_ci(metrics, f'{split}/{name}')} |")
    for task, num_classes in TASKS.items():
        lines += ["", f"## {task.upper()}", "", *header]
        names = ["acc", "f1", "qwk", "ece", "num"]
        names += [f"per_class_acc_{task}_{k}" for k in range(num_classes)]
        for name in names:
            key = f"{split}/{name}" if name.startswith("per_class") else f"{split}/{name}_{task}"
            value = metrics.get(key)
            shown = (
                str(int(value)) if name == "num" and value is not None else _fmt_ci(metrics, key)
            )
            lines.append(f"| {key.split('/', 1)[1]} | {shown} |")
        threshold = metrics.get(f"{split}/referable_{task}_threshold")
        lines.append(f"| referable (>= {REFERABLE_FROM[task]}) threshold | {_fmt(threshold)} |")
        for m in ("sensitivity", "specificity", "auroc"):
            key = f"{split}/referable_{task}_{m}"
            lines.append(f"| referable (>= {REFERABLE_FROM[task]}) {m} | {_fmt_ci(metrics, key)} |")
        matrix = metrics.get(f"{split}/confusion_{task}")
        if matrix is not None:
            lines += ["", "Confusion matrix (rows = true grade, columns = predicted):", ""]
            lines.append(
                "| true \\ pred | " + " | ".join(str(k) for k in range(num_classes)) + " |"
            )
            lines.append("|---" * (num_classes + 1) + "|")
            for k, row in enumerate(matrix):
                lines.append(f"| {k} | " + " | ".join(str(int(v)) for v in row) + " |")
    patients = metrics.get(f"{split}/patient/num_patients")
    if patients is not None:
        lines += ["", f"## Per patient ({patients} patients; a patient's grade is the worse eye's)"]
        lines += ["", *header]
        for name in CI_METRICS:
            lines.append(f"| {name} | {_fmt_ci(metrics, f'{split}/patient/{name}')} |")
    per_source = sorted(
        {k.split("/")[1] for k in metrics if k.count("/") == 2 and k.split("/")[1] != "patient"}
    )
    if per_source:
        lines += ["", "## Per source", "", "| source | " + " | ".join(HEADLINE) + " |"]
        lines.append("|---" * (len(HEADLINE) + 1) + "|")
        for source in per_source:
            values = [_fmt(metrics.get(f"{split}/{source}/{m}")) for m in HEADLINE]
            lines.append(f"| {source} | " + " | ".join(values) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"- plots/{p.name}" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def print_table(metrics: dict[str, Any], split: str, console: Console | None = None) -> None:
    """The headline numbers, once, at the end of the run."""
    table = Table(title=f"VisionCare — {split} evaluation")
    table.add_column("metric")
    table.add_column(split, justify="right")
    table.add_column("95 % CI", justify="right")
    keys = [*HEADLINE, "ece_dr", "ece_dme"]
    keys += [
        f"referable_{t}_{m}"
        for t in TASKS
        for m in ("threshold", "sensitivity", "specificity", "auroc")
    ]
    for name in keys:
        key = f"{split}/{name}"
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        interval = "" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"
        table.add_row(name, _fmt(metrics.get(key)), interval)
    (console or Console()).print(table)
