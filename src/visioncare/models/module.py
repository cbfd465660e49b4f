"""`VisionCareModule`: the LightningModule that trains `TwoHeadNet` with a multi-task loss.

One `model_step` serves train, val and test. Optimizer and scheduler arrive from Hydra as partials.
All parameter groups exist from the first step — `heads`, `loss` (the learnable log-variances, no
weight decay) and one group per backbone unfreezing chunk (`backbone_top`, `backbone_mid`,
`backbone_rest`), each with a `<name>_no_decay` twin for its biases and norm parameters (timm's
weight-decay rule) — so that gradual unfreezing only flips `requires_grad` and the optimizer and
scheduler state keep one shape across stages and resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from visioncare import IGNORE_INDEX, TASKS
from visioncare.data.input_spec import CHECKPOINT_KEY as INPUT_SPEC_KEY
from visioncare.data.input_spec import InputSpec, legacy_input_spec
from visioncare.errors import ConfigurationError, TrainingDivergedError
from visioncare.models.loss import UncertaintyWeightedLoss
from visioncare.models.net import UNFREEZE_FRACTIONS, TwoHeadNet
from visioncare.scoring.calibration import CHECKPOINT_KEY as CALIBRATION_KEY
from visioncare.scoring.calibration import temperatures_from
from visioncare.scoring.metrics import MultiTaskMetrics
from visioncare.scoring.referral import CHECKPOINT_KEY as OPERATING_POINTS_KEY
from visioncare.utils.loops import epoch_ends_after
from visioncare.utils.rng import capture_rng_state, restore_rng_state

# Backbone chunks by depth, one per gradual-unfreezing stage after the first: stage 1 unfreezes
# `backbone_top` (the top 25 % of blocks), stage 2 adds `backbone_mid`, stage 3 `backbone_rest`.
BACKBONE_CHUNKS: tuple[tuple[str, float], ...] = tuple(
    zip(("backbone_top", "backbone_mid", "backbone_rest"), UNFREEZE_FRACTIONS[1:], strict=True)
)


class VisionCareModule(L.LightningModule):
    """Multi-task DR/DME grading.

    Args:
        backbone: timm model name (config key `model.backbone`).
        pretrained: false, true (timm hub) or "offline" (packaged ImageNet weights;
            `model.pretrained`).
        weights_path: local timm checkpoint (`model.weights_path`).
        weights_cache_dir: where packaged weights are converted to (`model.weights_cache_dir`).
        dropout: dropout before each head.
        optimizer: partial optimizer taking the parameter groups (e.g. AdamW).
        scheduler: partial LR scheduler taking the optimizer (e.g. CosineAnnealingLR), or None.
        loss: the multi-task loss module; default `UncertaintyWeightedLoss`.
        backbone_lr_mult: backbone groups' LR as a multiple of the heads' LR.
        backbone_lr_decay: further factor per chunk below the top (discriminative LR): the
            top 25 % trains at ``lr·mult``, the next 25 % at ``lr·mult·decay``, the rest at
            ``lr·mult·decay²``. 1.0 = one LR for the whole backbone.
        channels_last: NHWC memory format (faster convolutions with bf16/fp16 on CPU and GPU).
        compile: `torch.compile` the network in place (state-dict keys unchanged, so checkpoints
            stay interchangeable) once every parameter is trainable, i.e. when gradual
            unfreezing reaches its last stage (at once with `unfreeze_step=0`). Compiling
            earlier would recompile at every stage (requires_grad is guarded) on top of the
            train/eval and last-partial-batch variants, past Dynamo's recompile limit, after
            which it silently runs eager.
        nonfinite_check_every: read the accumulated "all losses finite" flag back every this
            many training batches (and at each epoch's last batch) instead of every step.
        dr_head: ``"softmax"`` or ``"ordinal"`` (CORN; its DR output is (N, 5) class
            log-probabilities, see `visioncare.models.net.corn_log_probs`).
        grad_checkpointing: timm's activation checkpointing in the backbone (memory for time).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnetv2_s",
        pretrained: bool | str = False,
        weights_path: str | None = None,
        dropout: float = 0.2,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        backbone_lr_mult: float = 1.0,
        backbone_lr_decay: float = 1.0,
        channels_last: bool = True,
        compile: bool = False,
        weights_cache_dir: str | None = None,
        nonfinite_check_every: int = 16,
        dr_head: str = "softmax",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "loss"])
        self.net = TwoHeadNet(
            backbone,
            pretrained,
            weights_path,
            dropout,
            weights_cache_dir=weights_cache_dir,
            dr_head=dr_head,
            grad_checkpointing=grad_checkpointing,
        )
        self.loss_fn = loss if loss is not None else UncertaintyWeightedLoss()
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.backbone_lr_mult = backbone_lr_mult
        self.backbone_lr_decay = backbone_lr_decay
        self.channels_last = channels_last
        self.compile_net = compile
        self.nonfinite_check_every = max(1, nonfinite_check_every)
        self._finite: Tensor | None = None  # all losses finite since the last check (device)
        # Attributes, not a ModuleDict: a "train" key would shadow nn.Module.train.
        self.train_metrics = MultiTaskMetrics("train", full=False)
        # Epoch means of the training losses (their states are not saved in checkpoints).
        names = ["loss", *(f"loss_{task}" for task in TASKS)]
        self.train_losses = nn.ModuleDict(
            {name: MeanMetric(nan_strategy="disable") for name in names}
        )
        self.val_metrics = MultiTaskMetrics("val")
        self.test_metrics = MultiTaskMetrics("test")
        # Per-dataset val/test metrics when several sources train together (built in `setup`
        # from the datamodule's source names).
        self.source_names: list[str] = []
        self.source_metrics = nn.ModuleDict()
        # Filled at each val/test epoch end: split → task → confusion matrix (for plots/reports).
        self.confusion: dict[str, dict[str, Tensor]] = {}
        # The inputs the network is trained on: the datamodule's at every checkpoint save, the
        # checkpoint's after loading one (read by eval, predict and export).
        self.input_spec: InputSpec | None = None
        # Task → referable threshold chosen on validation (`visioncare.scoring.referral`), set
        # after fit.
        self.operating_points: dict[str, dict[str, Any]] | None = None
        # Per-task temperatures fitted on validation after training (None: not calibrated,
        # e.g. an older checkpoint or `calibration=none`; probabilities are the raw softmax).
        self.temperatures: dict[str, float] | None = None
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        """Learn the datasets from the trainer's datamodule: per-source metrics if several."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self._build_source_metrics(getattr(datamodule, "source_names", []))

    def _build_source_metrics(self, names: list[str]) -> None:
        """Report val/test metrics per dataset as well (`val/<source>/acc_dr`) if several."""
        self.source_names = list(names)
        self.source_metrics = nn.ModuleDict(
            {
                f"{split}__{name}": MultiTaskMetrics(f"{split}/{name}")
                for split in ("val", "test")
                for name in (self.source_names if len(self.source_names) > 1 else [])
            }
        )

    def maybe_compile(self) -> bool:
        """Compile the network once all of it trains (see `compile`); True if it compiled now."""
        compiled = getattr(self.net, "_compiled_call_impl", None) is not None
        if not self.compile_net or compiled:
            return False
        if not all(p.requires_grad for p in self.net.parameters()):
            return False
        self.net.compile()
        return True

    def split_metrics(self, split: str) -> MultiTaskMetrics:
        """The metric set of ``train``, ``val`` or ``test``."""
        return getattr(self, f"{split}_metrics")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        # Loaders and predict.py deliver NCHW; with channels-last weights an NCHW input makes
        # every convolution convert layouts (bench/inference.py measures the difference).
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    # ----------------------------------------------------------------------------- steps
    def model_step(self, batch: dict[str, Any], split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward, loss and metric update shared by train/val/test; returns the losses."""
        images = batch["image"]
        logits = self(images)
        targets = {task: batch[task] for task in TASKS}
        total, task_losses = self.loss_fn(logits, targets)
        batch_size = images.shape[0]
        detached = {t: v.detach() for t, v in logits.items()}
        if split == "train":
            self._accumulate_train(total, task_losses, detached, targets, batch_size)
            return total, task_losses
        # Padding samples (`EvalShardSampler` tops up short DDP shards) carry no weight here and
        # no labels for the metrics. (One host read per evaluation step; the metrics' input
        # checks read back anyway.)
        padding = batch.get("padding")
        real = batch_size if padding is None else int((~padding).sum())
        self.log_dict(
            {f"{split}/loss": total, **{f"{split}/loss_{t}": v for t, v in task_losses.items()}},
            on_step=False,
            on_epoch=True,
            batch_size=real,
            sync_dist=True,
        )
        self.split_metrics(split).update(detached, targets)
        if self.source_metrics:
            # Other sources' samples count as ungraded (-1) rather than being cut out: every
            # rank then updates every source's metrics, even with no sample of it in its shard,
            # so all ranks take part in the same DDP reductions at epoch end (no hang).
            for index, name in enumerate(self.source_names):
                other = batch["source"] != index
                self.source_metrics[f"{split}__{name}"].update(
                    detached, {t: v.masked_fill(other, IGNORE_INDEX) for t, v in targets.items()}
                )
        return total, task_losses

    def _accumulate_train(
        self,
        total: Tensor,
        task_losses: dict[str, Tensor],
        logits: dict[str, Tensor],
        targets: dict[str, Tensor],
        batch_size: int,
    ) -> None:
        """Add a training batch to the epoch's running means and metrics, on the device.

        Nothing is logged per step: a `self.log` call per value and step was the largest part
        of the framework's overhead over a plain loop (bench/training_speed.py). The epoch's
        values are logged once, after its last batch (`on_train_batch_end`).
        """
        losses = {"loss": total, **{f"loss_{t}": v for t, v in task_losses.items()}}
        for name, value in losses.items():
            # One entry per sample, not weight=batch_size: with nan_strategy="disable" (no host
            # sync) torchmetrics' MeanMetric drops the weights (seen with torchmetrics 1.9).
            self.train_losses[name].update(value.detach().expand(batch_size))
        self.train_metrics.update(logits, targets)

    def _log_train_epoch(self) -> None:
        """Log the epoch's mean losses, metrics and task sigmas once, then reset them.

        Runs after the epoch's last batch, still inside the training loop, so Lightning reduces
        the values before any `on_train_epoch_end` hook (`EpochMetricsCSV` reads them there).
        A no-op when nothing was accumulated (already logged this epoch).
        """
        if not self.train_losses["loss"].update_called:
            return
        values: dict[str, Any] = {
            f"train/{name}": metric.compute() for name, metric in self.train_losses.items()
        }
        values.update(self.train_metrics.compute())
        values.update({f"loss/sigma_{t}": s for t, s in self.loss_fn.task_sigmas().items()})
        for metric in self.train_losses.values():
            metric.reset()
        self.train_metrics.reset()
        # Values are already reduced over the epoch (and over DDP ranks, by torchmetrics).
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, task_losses = self.model_step(batch, "train")
        # Finiteness is accumulated on the device and read back every `nonfinite_check_every`
        # batches and after the epoch's last one (`on_train_batch_end`): a GPU is not
        # synchronised every step, and the check still comes before the epoch's checkpoints
        # could store diverged weights.
        finite = torch.stack([torch.isfinite(v.detach()) for v in (total, *task_losses.values())])
        self._finite = finite if self._finite is None else self._finite & finite
        if (batch_idx + 1) % self.nonfinite_check_every == 0:
            self._raise_if_diverged(batch_idx, list(task_losses))
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._trainer is not None and epoch_ends_after(self.trainer, batch_idx):
            if self._finite is not None:  # losses since the last periodic check
                self._raise_if_diverged(batch_idx, list(TASKS))
            self._log_train_epoch()

    def _raise_if_diverged(self, batch_idx: int, tasks: list[str]) -> None:
        """Raise `TrainingDivergedError` if a loss since the last check was NaN or infinite."""
        total_ok, *tasks_ok = self._finite.tolist()
        self._finite = None
        if total_ok and all(tasks_ok):
            return
        bad = [task for task, ok in zip(tasks, tasks_ok, strict=True) if not ok]
        first = batch_idx - batch_idx % self.nonfinite_check_every
        raise TrainingDivergedError(
            f"non-finite training loss (task: {', '.join(bad) or 'total'}) at epoch "
            f"{self.current_epoch}, batches {first}-{batch_idx}; the last good checkpoint is "
            "kept. Lower model.optimizer.lr or check the input data."
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Float32 softmax probabilities per task, (N, C): what eval scores, from `trainer.predict`.

        Every sample is kept: `trainer.predict` runs single-process, so no shard is padded.
        """
        logits = self(batch["image"])
        return {task: logits[task].float().softmax(dim=1) for task in TASKS}

    # ----------------------------------------------------------------------------- epoch ends
    def on_train_epoch_start(self) -> None:
        # Callbacks' epoch-start hooks run first: the unfreezing stage of this epoch is set.
        self.maybe_compile()

    def on_train_epoch_end(self) -> None:
        # Normally a no-op: the values were logged after the last batch. An epoch that ended
        # before its planned last batch still gets them logged here.
        self._log_train_epoch()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, split: str) -> None:
        metrics = self.split_metrics(split)
        values = metrics.compute()
        self.confusion[split] = metrics.confusion_matrices()
        metrics.reset()
        for key, per_source in self.source_metrics.items():
            if key.startswith(f"{split}__") and per_source.update_called:
                source_values = per_source.compute()  # counts synchronised over DDP ranks
                per_source.reset()
                if any(v > 0 for k, v in source_values.items() if "/num_" in k):
                    values.update(source_values)  # a source absent from the split: no keys
        # Values are already synchronised by torchmetrics across DDP ranks.
        headline = {f"{split}/avg_acc", f"{split}/acc_dr", f"{split}/acc_dme"}
        self.log_dict({k: v for k, v in values.items() if k in headline}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in headline})

    # ----------------------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Heads, loss and backbone chunks; every trainable parameter in exactly one group.

        Each chunk is split by timm's weight-decay rule: weights with two or more dimensions
        (convolution kernels, linear matrices) keep the optimizer's weight decay; 1-D and 0-D
        parameters (biases, norm scales and shifts) go to a ``<name>_no_decay`` twin with
        ``weight_decay=0``, because shrinking them towards zero only fights normalisation. The
        loss's log-variances never decay (decay would pull every task weight to 1). All groups
        exist from the first step, frozen or not, so optimizer state keeps one shape.
        """
        groups: list[dict[str, Any]] = [
            *_split_by_decay("heads", list(self.net.heads.parameters())),
            {"name": "loss", "params": list(self.loss_fn.parameters()), "weight_decay": 0.0},
        ]
        # Discriminative LR: chunk k below the top (0 top, 1 mid, 2 rest) trains at
        # lr · backbone_lr_mult · backbone_lr_decay**k, so early, generic layers move least.
        scales = [self.backbone_lr_mult * self.backbone_lr_decay**k for k in range(3)]
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if base_lr is None and any(scale != 1.0 for scale in scales):
            raise ConfigurationError(
                "model.backbone_lr_mult / model.backbone_lr_decay need an explicit "
                "model.optimizer.lr to scale"
            )
        seen: set[int] = set()
        for (name, top_share), scale in zip(BACKBONE_CHUNKS, scales, strict=True):
            chunk = [p for p in self.net.top_blocks(top_share) if id(p) not in seen]
            seen.update(id(p) for p in chunk)
            for group in _split_by_decay(name, chunk):
                if scale != 1.0:
                    group["lr"] = base_lr * scale
                groups.append(group)
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1},
        }

    # ----------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if callable(getattr(datamodule, "input_spec", None)):
            self.input_spec = datamodule.input_spec()
        if self.input_spec is not None:
            checkpoint[INPUT_SPEC_KEY] = self.input_spec.as_dict()
        # Which weights training started from (package + sha256, hub id, file or random).
        checkpoint["visioncare_weights"] = dict(self.net.weights_provenance)
        if self.operating_points:
            checkpoint[OPERATING_POINTS_KEY] = self.operating_points
        if self.temperatures:
            checkpoint[CALIBRATION_KEY] = {"method": "temperature", **self.temperatures}
        # Dropout draws from the global generators: without their state a resumed run diverges.
        checkpoint["visioncare_rng"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if INPUT_SPEC_KEY in checkpoint:
            self.input_spec = InputSpec.from_dict(checkpoint[INPUT_SPEC_KEY])
        else:
            self.input_spec = legacy_input_spec(checkpoint) or self.input_spec
        self.net.weights_provenance = checkpoint.get("visioncare_weights", {"source": "unknown"})
        self.operating_points = checkpoint.get(OPERATING_POINTS_KEY, self.operating_points)
        self.temperatures = temperatures_from(checkpoint.get(CALIBRATION_KEY)) or self.temperatures
        rng = checkpoint.get("visioncare_rng")
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_state(rng)


def _split_by_decay(name: str, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """``[{name: ≥2-D weights}, {name_no_decay: biases and norms, weight_decay=0}]``.

    The rule is timm's ``param_groups_weight_decay`` (``ndim <= 1`` → no decay); it is kept here
    rather than called because timm's helper builds groups for a whole model, while ours must
    stay split by head/backbone chunk for the discriminative LR and the unfreezing stages.
    """
    return [
        {"name": name, "params": [p for p in params if p.ndim > 1]},
        {
            "name": f"{name}_no_decay",
            "params": [p for p in params if p.ndim <= 1],
            "weight_decay": 0.0,
        },
    ]
