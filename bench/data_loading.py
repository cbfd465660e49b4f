"""Benchmark: can the input pipeline keep EfficientNetV2-S fed on IDRiD-sized photographs?

Why: IDRiD ships 4288×2848 JPEGs. Decoding and resizing one costs tens of milliseconds, far more
than a training step can spare per image on a small machine, which is why VisionCare preprocesses
every image once into a `.npy` cache and only augments the small cached copy each epoch. This
script measures each stage on synthetic photographs of the real size and checks the two budgets
the design relies on:

* warm-epoch data time ≤ 2 ms per image (reading a cached copy + augmentation + collation);
* the loader produces images ≥ 5× faster than the model trains on them, so the loader's worker
  processes need a small share of the CPU and the model never waits.

It is a report, not a test: it prints PASS/FAIL next to each budget and always exits 0.

Run with ``make bench`` (``make bench ARGS="--images 48 --workers 4"``) or
``.venv/bin/python bench/data_loading.py --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from common import Row, machine_line, print_table, save_rows
from torch import nn
from torch.utils.data import DataLoader

from visioncare.data.cache import PreprocessedCache
from visioncare.data.dataset import EpochSeededSampler, FundusDataset
from visioncare.data.preprocess import PreprocessConfig, preprocess
from visioncare.data.records import Record
from visioncare.data.synthetic.render import render_fundus
from visioncare.data.transforms import AugmentConfig, build_train_transform
from visioncare.models.net import TwoHeadNet
from visioncare.utils.accelerator import resolve_precision

IDRID_WIDTH, IDRID_HEIGHT = 4288, 2848  # Kowa VX-10α, as IDRiD ships them
RENDER_SIZE = 1024  # rendering at full size would take far longer than the benchmark itself
JPEG_QUALITY = 95
BACKBONE = "tf_efficientnetv2_s"  # conf/model/effv2s.yaml
IMAGE_SIZE = 224
CACHE_SIZE = 256
BATCH_SIZE = 16
# IDRiD's training split less the 20 % validation hold-out (413 × 0.8): one real epoch.
IDRID_EPOCH = 330
TIMED_EPOCHS = 3
WARMUP_STEPS = 1

TARGET_DATA_MS = 2.0
TARGET_RATIO = 5.0

# Valid (DR, DME) pairs, cycled so the photographs show the whole range of lesion loads.
GRADES = ((0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (4, 1), (4, 2))


# ------------------------------------------------------------------------------- test images


def _write_idrid_jpeg(job: tuple[Path, int]) -> Path:
    """Render one fundus and save it as an IDRiD-like photograph: 4288×2848, black sides, q95.

    The disc is upscaled from a smaller render: the decoder's cost depends on the pixel count
    and the JPEG's entropy, and an upscaled fundus on a black canvas is close to a real one on
    both (smooth retina, sharp vessels, large black borders that compress to almost nothing).
    """
    path, seed = job
    rng = np.random.default_rng(seed)
    dr, dme = GRADES[seed % len(GRADES)]
    fundus = render_fundus(dr, dme, RENDER_SIZE, rng)
    fundus = cv2.resize(fundus, (IDRID_HEIGHT, IDRID_HEIGHT), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((IDRID_HEIGHT, IDRID_WIDTH, 3), np.uint8)
    left = (IDRID_WIDTH - IDRID_HEIGHT) // 2
    canvas[:, left : left + IDRID_HEIGHT] = fundus
    bgr = cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")
    return path


def make_images(folder: Path, count: int) -> list[Path]:
    """Write ``count`` photographs in parallel processes (rendering is mostly Python, GIL-bound)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"IDRiD_{i + 1:03d}.jpg", i) for i in range(count)]
    workers = max(1, min(os.cpu_count() or 1, count))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_write_idrid_jpeg, jobs))


# ------------------------------------------------------------------------------- measurements


def per_image_ms(paths: Sequence[Path], work: Callable[[Path], object]) -> float:
    """Median single-thread milliseconds of ``work`` per image (robust to a stray hiccup)."""
    times = []
    for path in paths:
        start = time.perf_counter()
        work(path)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def full_decode_resize(path: Path) -> np.ndarray:
    """The cost the cache avoids every epoch: decode the whole JPEG, area-resize to cache size."""
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.resize(image, (CACHE_SIZE, CACHE_SIZE), interpolation=cv2.INTER_AREA)


def cold_cache_build(paths: Sequence[Path], root: Path) -> tuple[float, list[Path], int]:
    """Wall milliseconds per image to build an empty cache with the default thread count.

    Returns:
        (ms per image, cache file per image, number of threads used)
    """
    cache = PreprocessedCache(root, PreprocessConfig(size=CACHE_SIZE))
    start = time.perf_counter()
    entries, errors = cache.build(paths)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"cache build failed on generated images: {errors}")
    return elapsed * 1000 / len(paths), [entries[p] for p in paths], os.cpu_count() or 1


def warm_epochs(
    cached: Sequence[Path], workers: int, epoch_size: int, backbone: str = BACKBONE
) -> tuple[float, float]:
    """Data time of warm epochs: cached copies → training augmentation → batches, no model.

    The cached files are listed round-robin up to ``epoch_size`` samples so an epoch lasts long
    enough to time; reading a warm `.npy` costs the same whichever file it is. One warm-up epoch
    starts the (persistent) workers and fills the page cache, as in any epoch after the first.

    Returns:
        (milliseconds per image, images per second)
    """
    files = [cached[i % len(cached)] for i in range(epoch_size)]
    records = [
        Record(image=Path(f"bench_{i}"), dr=i % 5, dme=0, source="bench", key=str(i))
        for i in range(epoch_size)
    ]
    pretrained = timm.models.get_pretrained_cfg(backbone)  # mean/std as the backbone expects
    transform = build_train_transform(IMAGE_SIZE, pretrained.mean, pretrained.std, AugmentConfig())
    dataset = FundusDataset(records, files, transform, seed=0)
    sampler = EpochSeededSampler(dataset, num_replicas=1, rank=0, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=False,
    )
    images = 0
    elapsed = 0.0
    for epoch in range(TIMED_EPOCHS + 1):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(batch["image"].shape[0] for batch in loader)
        if epoch > 0:  # epoch 0 is the warm-up
            elapsed += time.perf_counter() - start
            images += count
    del loader  # stop the persistent workers before the model benchmark needs the cores
    return elapsed * 1000 / images, images / elapsed


def model_throughput(steps: int, backbone: str = BACKBONE) -> tuple[float, str]:
    """Training images/s of the backbone (EfficientNetV2-S) at 224 px, b16, AdamW, as in training.

    On the GPU when there is one (the loader then feeds a GPU, the case its budget is about),
    else on the CPU. Precision follows `trainer.precision=auto`: bf16 autocast on bf16 GPUs
    (fp16 on older ones) and on CPUs with native bf16; fp32 on other CPUs (emulated bf16 is an
    order of magnitude slower than fp32). GPU timing is synchronised before and after.

    Returns:
        (images per second, "<precision> on <device>")
    """
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = TwoHeadNet(backbone).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    precision = str(resolve_precision("auto", device.type))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    images = torch.randn(BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, device=device).contiguous(
        memory_format=torch.channels_last
    )
    dr = torch.randint(0, 5, (BATCH_SIZE,), device=device)
    dme = torch.randint(0, 3, (BATCH_SIZE,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(images)
            loss = loss_fn(out["dr"].float(), dr) + loss_fn(out["dme"].float(), dme)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP_STEPS):  # first steps allocate buffers and pick kernels
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    elapsed = time.perf_counter() - start
    return steps * BATCH_SIZE / elapsed, f"{precision} on {device.type}"


# ------------------------------------------------------------------------------- report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Data-loading benchmark on IDRiD-sized JPEGs (a report: always exits 0)."
    )
    parser.add_argument("--images", type=int, default=24, help="photographs to generate (24)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (3)")
    parser.add_argument(
        "--epoch-size",
        type=int,
        default=IDRID_EPOCH,
        help=f"samples per warm epoch (default {IDRID_EPOCH}, one IDRiD training epoch)",
    )
    parser.add_argument("--backbone", default=BACKBONE, help=f"timm model ({BACKBONE})")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.workers < 0 or args.steps < 1 or args.epoch_size < 1:
        parser.error("need --images >= 1, --workers >= 0, --steps >= 1, --epoch-size >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    print(f"VisionCare data-loading benchmark — {machine_line()}, OpenCV {cv2.__version__}")
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as tmp:
        start = time.perf_counter()
        paths = make_images(Path(tmp) / "images", args.images)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
        print(
            f"Generated {len(paths)} {IDRID_WIDTH}×{IDRID_HEIGHT} JPEGs (q{JPEG_QUALITY}, "
            f"{mb:.1f} MiB each) in {time.perf_counter() - start:.1f} s\n"
        )
        decode_ms = per_image_ms(paths, full_decode_resize)
        config = PreprocessConfig(size=CACHE_SIZE)
        preprocess_ms = per_image_ms(paths, lambda p: preprocess(p, config))
        build_ms, cached, threads = cold_cache_build(paths, Path(tmp) / "cache")
        data_ms, loader_ips = warm_epochs(cached, args.workers, args.epoch_size, args.backbone)
    model_ips, precision = model_throughput(args.steps, args.backbone)
    ratio = loader_ips / model_ips

    rows = [
        Row(
            f"Full decode + INTER_AREA resize to {CACHE_SIZE} (1 thread, reference)",
            f"{decode_ms:.1f} ms/image",
        ),
        Row(
            "preprocess(): reduced decode + crop + resize (1 thread)",
            f"{preprocess_ms:.1f} ms/image",
        ),
        Row(f"Cold cache build ({threads} threads, wall)", f"{build_ms:.1f} ms/image"),
        Row(
            f"Warm epoch data time ({args.workers} workers, {TIMED_EPOCHS} epochs)",
            f"{data_ms:.2f} ms/image ({loader_ips:.0f} img/s)",
            f"≤ {TARGET_DATA_MS:g} ms/image",
            data_ms <= TARGET_DATA_MS,
        ),
        Row(
            f"Model training, {args.backbone} {IMAGE_SIZE} px b{BATCH_SIZE} ({precision})",
            f"{model_ips:.2f} img/s",
        ),
        Row(
            "Loader ÷ model throughput",
            f"{ratio:.0f}×",
            f"≥ {TARGET_RATIO:g}×",
            ratio >= TARGET_RATIO,
        ),
    ]
    print_table(rows)
    save_rows(args.json, "Data loading", rows)
    per_epoch_decode = decode_ms / max(args.workers, 1)
    print(
        f"\nDecoding the originals every epoch instead would cost ≈{per_epoch_decode:.0f} ms/image "
        f"with the same workers ({per_epoch_decode / data_ms:.0f}× the cached pipeline).\n"
        "Loader and model were each timed alone on the whole machine; in training they share it,"
        f" and the loader needs about 1/{ratio:.0f} of it.\n"
        f"Total {time.perf_counter() - began:.0f} s."
    )
    return 0  # a report: budgets are printed, never enforced through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
