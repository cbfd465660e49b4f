"""Benchmark: prediction speed with PyTorch (the checkpoint) and onnxruntime (the export).

`predict.py` accepts either a training checkpoint or the `model.onnx` that `export.py` writes.
This script makes both from the real pipeline — one short training run of EfficientNetV2-S at
224 px (`visioncare.tasks.train.run`), then `visioncare.tasks.export.run` — and times:

* **Model only**: batches of ``--batch-size`` preprocessed images through the network, PyTorch
  eager (channels-last, inference mode, as `predict.py` runs it) against onnxruntime (CPU). On a
  machine with CUDA, PyTorch on the GPU is added for reference (onnxruntime's CPU build has no
  GPU provider); the budget compares the two CPU engines.
* **predict.py pipeline**: `visioncare.serving.predictor.predict_paths` over ``--images`` photos of
  the synthetic set with ``--workers`` loader workers — decoding, fundus crop, resize,
  normalisation and the model — the throughput a user of `predict.py` sees.

Engines alternate (PyTorch, ONNX, PyTorch, ONNX...) and each figure is the median of its rounds,
so a drift of the machine's speed does not favour either. Budget: onnxruntime at least as fast as
PyTorch eager on the CPU. A report, not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import (
    Row,
    compose_config,
    machine_line,
    print_table,
    quiet,
    ratio_row,
    save_rows,
    scratch_run_overrides,
)
from torch import Tensor

from visioncare.serving.loading import input_spec, load_model, load_onnx
from visioncare.serving.predictor import predict_paths
from visioncare.tasks.export import run as export
from visioncare.tasks.train import run as train

TARGET_ONNX = 1.0


def make_checkpoint(tmp: Path, args: argparse.Namespace) -> Path:
    """best.ckpt of one training step of the default model at ``--image-size``."""
    overrides = [
        *scratch_run_overrides(tmp),
        f"model.backbone={args.backbone}",
        "data.num_train=20",
        f"data.num_test={args.images}",
        f"data.render_size={args.render_size}",
        f"data.image_size={args.image_size}",
        f"data.cache_size={args.image_size + args.image_size // 8}",
        "data.num_workers=0",
        "unfreeze_step=0",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "logger=none",
    ]
    cfg = compose_config("train", overrides, tmp / "run")
    train(cfg)
    return tmp / "run" / "checkpoints" / "best.ckpt"


def export_onnx(tmp: Path, ckpt: Path) -> Path:
    """`export.py ckpt_path=... output_dir=...` in-process; returns model.onnx."""
    out = tmp / "export"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output_dir={out}"], tmp / "exp"))
    return out / "model.onnx"


def synthetic_test_photos(tmp: Path) -> list[Path]:
    """The synthetic set's test photographs (IDRiD layout: 1. Original Images/b. Testing Set)."""
    return sorted(p for p in (tmp / "synthetic").rglob("*") if "Testing" in p.parent.name)


def alternate(engines: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median seconds of each engine's callable over ``rounds`` interleaved rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            seconds[name].append(run())
    return {name: statistics.median(values) for name, values in seconds.items()}


def timed(work: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


def measure(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as name:
        tmp = Path(name)
        with quiet():
            ckpt = make_checkpoint(tmp, args)
            onnx_path = export_onnx(tmp, ckpt)
        model, _ = load_model(ckpt, "cpu")
        spec = input_spec(model)
        onnx_net, onnx_spec = load_onnx(onnx_path)
        assert onnx_spec == spec, "the export's preprocessing must equal the checkpoint's"
        photos = synthetic_test_photos(tmp)[: args.images]
        if not photos:
            raise RuntimeError(f"no test photographs found under {tmp / 'synthetic'}")

        generator = torch.Generator().manual_seed(0)
        size = spec.image_size
        batch = torch.randn(args.batch_size, 3, size, size, generator=generator)

        def eager(images: Tensor) -> dict[str, Tensor]:
            with torch.inference_mode():
                return model(images)

        networks = {"PyTorch eager": eager, "onnxruntime": onnx_net}
        if torch.cuda.is_available():  # for reference: the budget compares the CPU engines
            gpu_model, _ = load_model(ckpt, "cuda")

            def eager_cuda(images: Tensor) -> dict[str, Tensor]:
                with torch.inference_mode():
                    logits = gpu_model(images.to("cuda", non_blocking=True))
                torch.cuda.synchronize()
                return logits

            networks["PyTorch eager on CUDA"] = eager_cuda
        for net in networks.values():  # warm-up: allocations, kernel and graph optimisation
            net(batch)
        model_s = alternate(
            {name: timed(lambda net=net: net(batch)) for name, net in networks.items()},
            args.rounds,
        )

        def pipeline(net: Callable[[Tensor], dict[str, Tensor]]) -> None:
            with quiet():
                predict_paths(net, spec, photos, args.batch_size, args.workers, "cpu")

        pipeline_s = alternate(
            {name: timed(lambda net=net: pipeline(net)) for name, net in networks.items()},
            max(2, args.rounds // 2),
        )

    model_ips = {name: args.batch_size / seconds for name, seconds in model_s.items()}
    pipeline_ips = {name: len(photos) / seconds for name, seconds in pipeline_s.items()}
    return [
        *engine_rows("Model only", f"{args.backbone} {size} px b{args.batch_size}", model_ips),
        *engine_rows(
            "predict.py pipeline", f"{len(photos)} photos, {args.workers} workers", pipeline_ips
        ),
    ]


def engine_rows(what: str, setting: str, images_per_second: dict[str, float]) -> list[Row]:
    """One row per engine, then the budgeted onnxruntime ÷ PyTorch-eager (CPU) ratio."""
    rows = [
        Row(f"{what}, {name} ({setting})", f"{value:.2f} img/s")
        for name, value in images_per_second.items()
    ]
    ratio = images_per_second["onnxruntime"] / images_per_second["PyTorch eager"]
    rows.append(ratio_row(f"{what}: onnxruntime ÷ PyTorch eager", ratio, TARGET_ONNX))
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Inference benchmark, PyTorch vs onnxruntime (a report: always exits 0)."
    )
    parser.add_argument(
        "--backbone", default="tf_efficientnetv2_s", help="timm model (tf_efficientnetv2_s)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="network input (224)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (16)")
    parser.add_argument("--images", type=int, default=48, help="photos for predict.py (48)")
    parser.add_argument("--render-size", type=int, default=512, help="photo side in px (512)")
    parser.add_argument("--workers", type=int, default=2, help="predict.py loader workers (2)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (4)")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    if min(args.image_size, args.batch_size, args.images, args.rounds) < 1 or args.workers < 0:
        parser.error("sizes, counts and rounds must be >= 1, --workers >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    print(f"VisionCare inference benchmark — {machine_line()}\n", flush=True)
    rows = measure(args)
    print_table(rows)
    save_rows(args.json, "Inference", rows)
    print(f"\nTotal {time.perf_counter() - began:.0f} s (incl. one training step and the export).")
    return 0  # a report: budgets are printed, never enforced through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
