"""Benchmark: does VisionCare train as fast as a hand-written PyTorch loop, and what do the recipe
and gradual unfreezing buy?

Three measurements, each printed next to its budget:

1. **Framework overhead.** The project's real training path — `conf/train.yaml` composed by Hydra,
   `visioncare.tasks.train.run`, the Lightning Trainer with every default callback and the
   TensorBoard logger, data from the preprocessed cache — against a plain PyTorch loop doing
   the same work: the same `TwoHeadNet` and `UncertaintyWeightedLoss`, AdamW, gradient clipping
   at norm 1, the same precision, memory format, batch, resolution and the same DataLoader, all
   layers trainable. The plain loop runs right before, between and after the project's two
   stage-3 epochs (from a callback, outside the timed spans), so a drift of the machine's speed
   moves both sides of the ratio alike instead of being blamed on the framework. Budget ≥ 0.95×.
2. **Frozen stages.** Images/s of the same project run at each gradual-unfreezing stage (one
   epoch per stage, `unfreeze_step=1`). Stage 0 trains the heads only and records no autograd
   graph through the backbone. Budget: stage 0 ≥ 3× stage 3. Stage 3 is the overhead row's run.
3. **CPU recipe.** fp32 vs bf16 autocast, NCHW vs channels-last, for EfficientNetV2-S training at
   224 px in a plain loop. Budget: the default recipe (`trainer.precision=auto` + channels-last)
   ≥ 1.8× fp32/NCHW. On a CPU without native bf16 (AVX-512 BF16/AMX) bf16 is emulated and an
   order of magnitude slower, so `auto` picks fp32 there and the budget cannot hold; those rows
   then use a small batch (`--emulated-bf16-batch`) to fit the time.

Iterations are timed from one batch start to the next (forward, backward, optimizer, logging,
callbacks, next batch) and summarised by the median after ``--warmup`` iterations.
A report, not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    BETWEEN_EPOCHS,
    Row,
    compose_config,
    load_step_times,
    machine_line,
    print_table,
    quiet,
    ratio_row,
    save_rows,
    scratch_run_overrides,
    steady_rate,
)
from hydra.utils import instantiate
from torch import nn

from visioncare.data.datamodule import FundusDataModule
from visioncare.models.loss import UncertaintyWeightedLoss
from visioncare.models.net import TwoHeadNet
from visioncare.tasks.train import run as train
from visioncare.utils.accelerator import (
    cpu_has_native_bf16,
    resolve_precision,
    resolve_trainer_flags,
)

BACKBONE = "tf_efficientnetv2_s"  # conf/model/effv2s.yaml, the default
EPOCHS = 5  # stages 0, 1, 2, 3, 3
FIRST_STAGE3_EPOCH = 3
STAGE_NAMES = ("heads", "top 25 %", "top 50 %", "all")
LR, WEIGHT_DECAY, CLIP_NORM = 3e-4, 1e-2, 1.0  # conf/model/effv2s.yaml, conf/trainer/default.yaml

TARGET_OVERHEAD = 0.95
TARGET_STAGE0 = 3.0
TARGET_RECIPE = 1.8


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string (None = plain fp32)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


class PlainLoop:
    """What a researcher would write by hand: model, loss, AdamW, clipping, autocast, a for loop."""

    def __init__(
        self, backbone: str, device: torch.device, precision: str, channels_last: bool
    ) -> None:
        torch.manual_seed(0)
        self.device = device
        self.dtype = autocast_dtype(precision)
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.net = TwoHeadNet(backbone).to(device, memory_format=self.layout).train()
        self.loss_fn = UncertaintyWeightedLoss().to(device)
        self.params = [*self.net.parameters(), *self.loss_fn.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

    def step(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        targets = {t: v.to(self.device, non_blocking=True) for t, v in targets.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.net(images)
            loss, _ = self.loss_fn(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def run(self, loader: torch.utils.data.DataLoader, iterations: int) -> list[float]:
        """Wall seconds between consecutive iteration starts, as `StepTimer` measures them."""
        starts: list[float] = []
        while len(starts) < iterations + 1:
            for batch in loader:
                starts.append(time.perf_counter())
                if len(starts) > iterations:
                    break
                self.step(batch["image"], {"dr": batch["dr"], "dme": batch["dme"]})
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return [b - a for a, b in itertools.pairwise(starts)]


# ------------------------------------------------------------------------ measurements


def bench_config(tmp: Path, args: argparse.Namespace, batches: int) -> list[str]:
    """Overrides of the project run: defaults but the size, a small synthetic set, 5 epochs.

    With `unfreeze_step=1` the epochs run stages 0, 1, 2, 3, 3: two stage-3 samples, so the
    overhead ratio averages over the machine's drift like the two plain-loop runs do.
    """
    return [
        *scratch_run_overrides(tmp),
        f"model.backbone={args.backbone}",
        f"data.num_train={int(batches * args.batch_size / 0.8) + args.batch_size}",
        "data.num_test=16",
        "data.render_size=256",
        f"data.image_size={args.image_size}",
        f"data.cache_size={args.image_size + args.image_size // 8}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "unfreeze_step=1",
        f"trainer.max_epochs={EPOCHS}",
        f"+trainer.limit_train_batches={batches}",
        "+trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "callbacks.early_stopping=null",  # five short epochs; nothing to stop
        "+callbacks.step_timer._target_=common.StepTimer",
        f"+callbacks.step_timer.path={tmp / 'steps.json'}",
    ]


def plain_loader(cfg, device: torch.device) -> torch.utils.data.DataLoader:
    """The project's own training DataLoader (same cache, augmentation, workers), no Trainer."""
    datamodule: FundusDataModule = instantiate(cfg.data)
    datamodule.pin_memory = device.type == "cuda"
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def framework_and_stages(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Project run (stages 0, 1, 2, 3, 3) with plain-loop runs around its stage-3 epochs.

    The order is: stages 0-2, plain, stage 3, plain, stage 3, plain. Each project epoch sits
    between two plain runs, so a drift of the machine's speed (±10 % over minutes on a shared
    VM) moves both sides of the ratio alike.
    """
    batches = args.warmup + args.steps + 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as name:
        tmp = Path(name)
        cfg = compose_config("train", bench_config(tmp, args, batches), tmp / "run")
        # The precision the project run will train in (`train` resolves the same way).
        precision = str(resolve_trainer_flags(cfg)["precision"])
        with quiet():
            loader = plain_loader(cfg, device)  # generates and caches the set once, for both
        iterations = args.warmup + args.steps

        plain_times: list[list[float]] = []
        plain_seconds = 0.0

        def plain_segment(epoch: int) -> None:
            """A plain-loop run right before each stage-3 epoch (and once after the fit)."""
            nonlocal plain_seconds
            if epoch >= FIRST_STAGE3_EPOCH:
                start = time.perf_counter()
                loop = PlainLoop(args.backbone, device, precision, channels_last=True)
                plain_times.append(loop.run(loader, iterations))
                plain_seconds += time.perf_counter() - start

        BETWEEN_EPOCHS.append(plain_segment)
        began = time.perf_counter()
        try:
            with quiet():
                train(cfg)
        finally:
            BETWEEN_EPOCHS.remove(plain_segment)
        project_seconds = time.perf_counter() - began - plain_seconds  # less the plain runs
        plain_segment(EPOCHS)
        epochs = load_step_times(tmp / "steps.json")

    def rate(times: Sequence[float]) -> float:
        return steady_rate(times[args.warmup :], args.batch_size)

    plain_rates = [rate(times) for times in plain_times]
    plain = statistics.mean(plain_rates)
    by_stage: dict[int, list[float]] = {}
    for epoch, times in sorted(epochs.items()):
        by_stage.setdefault(min(epoch, 3), []).append(rate(times))
    stage_rates = {stage: statistics.mean(values) for stage, values in by_stage.items()}
    project = stage_rates[3]
    size = f"{args.image_size} px b{args.batch_size}, {precision}"
    rows = [
        Row(
            f"Plain PyTorch loop ({size}), {len(plain_rates)} runs around them",
            " / ".join(f"{v:.2f}" for v in plain_rates) + " img/s",
        ),
        Row(
            f"Project: Hydra → Trainer → LightningModule ({size}), 2 epochs",
            " / ".join(f"{v:.2f}" for v in by_stage[3]) + " img/s",
        ),
        ratio_row("Project ÷ plain loop (means)", project / plain, TARGET_OVERHEAD),
    ]
    for stage, value in stage_rates.items():
        rows.append(Row(f"Stage {stage} ({STAGE_NAMES[stage]})", f"{value:.2f} img/s"))
    rows.append(ratio_row("Stage 0 ÷ stage 3", stage_rates[0] / stage_rates[3], TARGET_STAGE0))
    figures = {"plain": plain, "project": project, "project_seconds": project_seconds}
    return rows, figures


def recipe(args: argparse.Namespace) -> list[Row]:
    """fp32/bf16 × NCHW/channels-last training images/s at ``--recipe-size`` on the CPU."""
    device = torch.device("cpu")
    native = cpu_has_native_bf16()
    images_per_config: dict[tuple[str, bool], float] = {}
    batch_of: dict[str, int] = {
        "32-true": args.recipe_batch,
        "bf16-mixed": args.recipe_batch if native else args.emulated_bf16_batch,
    }
    # fp32 twice (NCHW/CL interleaved) so the machine's drift does not decide the layout question.
    plan = [
        ("32-true", False),
        ("32-true", True),
        ("32-true", False),
        ("32-true", True),
        ("bf16-mixed", False),
        ("bf16-mixed", True),
    ]
    times: dict[tuple[str, bool], list[float]] = {}
    for precision, channels_last in plan:
        batch = batch_of[precision]
        loop = PlainLoop(args.backbone, device, precision, channels_last)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, args.recipe_size, args.recipe_size, generator=generator)
        targets = {"dr": torch.randint(0, 5, (batch,)), "dme": torch.randint(0, 3, (batch,))}
        steps = args.recipe_steps if precision == "32-true" or native else 1
        loop.step(images, targets)  # warm-up: allocations, kernel choice
        for _ in range(steps):
            start = time.perf_counter()
            loop.step(images, targets)
            times.setdefault((precision, channels_last), []).append(time.perf_counter() - start)
    for key, durations in times.items():
        images_per_config[key] = steady_rate(durations, batch_of[key[0]])

    base = images_per_config[("32-true", False)]
    auto = str(resolve_precision("auto", "cpu"))
    rows = []
    for (precision, channels_last), value in images_per_config.items():
        layout = "channels-last" if channels_last else "NCHW"
        batch = batch_of[precision]
        note = "" if native or precision == "32-true" else ", emulated bf16"
        rows.append(
            Row(
                f"Recipe {precision} {layout} ({args.recipe_size} px b{batch}{note})",
                f"{value:.2f} img/s ({value / base:.2f}×)",
            )
        )
    rows.append(
        ratio_row(
            f"Default CPU recipe (auto = {auto}, channels-last) ÷ fp32 NCHW",
            images_per_config[(auto, True)] / base,
            TARGET_RECIPE,
            "" if native else "no native bf16 here: auto keeps fp32",
        )
    )
    return rows


# ------------------------------------------------------------------------ report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-speed benchmark (a report: always exits 0)."
    )
    parser.add_argument("--backbone", default=BACKBONE, help=f"timm model ({BACKBONE})")
    parser.add_argument("--image-size", type=int, default=128, help="project vs plain (128)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (16)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out (2)")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per run (10)")
    parser.add_argument("--recipe-size", type=int, default=224, help="recipe resolution (224)")
    parser.add_argument("--recipe-batch", type=int, default=16, help="recipe batch (16)")
    parser.add_argument("--recipe-steps", type=int, default=2, help="timed recipe steps (2)")
    parser.add_argument(
        "--emulated-bf16-batch",
        type=int,
        default=2,
        help="bf16 recipe batch on CPUs without native bf16 (2): a batch of 16 takes a minute",
    )
    parser.add_argument("--skip-recipe", action="store_true", help="only overhead and stages")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    if min(args.image_size, args.batch_size, args.steps, args.recipe_steps) < 1:
        parser.error("sizes, batch sizes and step counts must be >= 1")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a median of one step is noise)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    title = "Training speed"
    print(f"VisionCare training-speed benchmark — {machine_line()}\n", flush=True)
    rows, figures = framework_and_stages(args)
    if not args.skip_recipe:
        rows += recipe(args)
    print()
    print_table(rows)
    save_rows(args.json, title, rows)
    print(
        f"\nThe project run (5 short epochs incl. Trainer setup, validation, checkpoints) took "
        f"{figures['project_seconds']:.0f} s. Total {time.perf_counter() - began:.0f} s."
    )
    return 0  # a report: budgets are printed, never enforced through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
