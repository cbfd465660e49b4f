"""Benchmark: peak memory of training at the default settings.

Runs the real command, `python src/train.py`, in a child process with the default config
(EfficientNetV2-S, the synthetic set at its default size, batch 16, 2 loader workers) changed only
where the measurement needs it: a temporary data/log folder, a few batches, and
`unfreeze_step=0` so every layer trains from the first step (the last unfreezing stage, the
memory peak of a run). Reported:

* **Peak RSS of the training process**: `memory/rss_mb` from the run's `metrics.csv` (the
  process's own `ru_maxrss`, as every training run logs it).
* **Peak PSS of the whole process tree**: the trainer plus its DataLoader workers, sampled every
  ``--interval`` seconds from `/proc/<pid>/smaps_rollup`. PSS splits pages shared between the
  forked workers and the trainer, so the sum is what the run really occupies (RSS would count
  them once per process).
* **Peak GPU memory**: `memory/gpu_peak_mb` (tensors) and `memory/gpu_reserved_mb` (what the
  caching allocator held; nvidia-smi adds the CUDA context) from `metrics.csv`, on a GPU.

``--image-size 224`` adds a run at another resolution (224 px: the IDRiD presets' input).
A report, not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    ROOT,
    Row,
    compose_config,
    machine_line,
    print_table,
    save_rows,
    scratch_run_overrides,
)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                continue
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size of one process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class TreeSampler(threading.Thread):
    """Samples the summed PSS of a process tree until the root process exits."""

    def __init__(self, process: subprocess.Popen, interval: float) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.interval = interval
        self.peak_mb = 0.0
        self.peak_processes = 0

    def run(self) -> None:
        while self.process.poll() is None:
            pids = process_tree(self.process.pid)
            total = sum(pss_mb(pid) for pid in pids)
            if total > self.peak_mb:
                self.peak_mb, self.peak_processes = total, len(pids)
            time.sleep(self.interval)


def train_run(tmp: Path, image_size: int | None, args: argparse.Namespace) -> dict[str, float]:
    """One short `src/train.py` run; peak figures from its metrics.csv and the sampler."""
    label = f"{image_size}px" if image_size else "default"
    run_dir = tmp / f"run-{label}"
    overrides = [
        *scratch_run_overrides(tmp),  # the synthetic set in tmp is shared by the runs
        f"data.num_train={args.num_train}",
        "data.num_test=16",
        # Photos are rendered smaller than the default 512 px to save time; training reads the
        # cached copies (data.cache_size), which are the same either way.
        "data.render_size=256",
        f"hydra.run.dir={run_dir}",
        "unfreeze_step=0",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={args.batches}",
        "+trainer.limit_val_batches=2",
    ]
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if image_size:
        cache = image_size + image_size // 8
        overrides += [f"data.image_size={image_size}", f"data.cache_size={cache}"]
    command = [sys.executable, str(ROOT / "src" / "train.py"), *overrides]
    log_path = tmp / f"train-{label}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(process, args.interval)
        sampler.start()
        process.wait()
        sampler.join()
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"training failed (exit {process.returncode}):\n{tail}")
    with (run_dir / "metrics.csv").open(newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    result = {
        "rss_mb": float(row["memory/rss_mb"]),
        "tree_pss_mb": sampler.peak_mb,
        "processes": float(sampler.peak_processes),
    }
    for name in ("gpu_peak_mb", "gpu_reserved_mb"):
        if row.get(f"memory/{name}"):
            result[name] = float(row[f"memory/{name}"])
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak training memory at the default settings (a report: always exits 0)."
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="*",
        default=[],
        help="extra runs at these input sizes besides the default config's (e.g. 224)",
    )
    parser.add_argument("--backbone", help="timm model instead of the default config's")
    parser.add_argument("--batches", type=int, default=4, help="training batches per run (4)")
    parser.add_argument("--num-train", type=int, default=96, help="synthetic training set (96)")
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period, s (0.2)")
    parser.add_argument("--json", help="append the rows to this JSON-lines file (run_all.py)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.num_train < 20 or args.interval <= 0:
        parser.error("need --batches >= 1, --num-train >= 20, --interval > 0")
    return args


def step_probe(backbone: str, size: int, batch: int, checkpointing: bool, steps: int) -> dict:
    """Peak RSS and mean step time of plain training steps (one process, random weights).

    Runs in a fresh child process per setting (see `checkpointing_table`), so ``ru_maxrss`` is
    this setting's own peak: the allocator never returns memory between settings otherwise.
    One warm-up step, then ``steps`` timed forward + backward + AdamW steps, fp32.
    """
    import resource

    import torch

    from visioncare.models.net import TwoHeadNet

    torch.manual_seed(0)
    net = TwoHeadNet(backbone, grad_checkpointing=checkpointing).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    times = []
    for i in range(steps + 1):
        began = time.perf_counter()
        out = net(images)
        loss = sum(torch.nn.functional.cross_entropy(o, labels) for o in out.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mb": peak, "step_s": sum(times) / len(times)}


def checkpointing_table(backbone: str, size: int, batches: list[int], steps: int) -> list[Row]:
    """Peak RSS and step time with and without `model.grad_checkpointing`, per batch size."""
    import json

    rows = []
    for batch in batches:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--step-probe", backbone, str(size), str(batch)]
            command += [str(int(checkpointing)), str(steps)]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            what = f"{backbone} {size} px b{batch}, grad_checkpointing={str(checkpointing).lower()}"
            if done.returncode:
                rows.append(Row(what, f"failed: {done.stderr.strip().splitlines()[-1:]}"))
                continue
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            value = f"{figures['rss_mb']:.0f} MiB peak RSS, {figures['step_s']:.1f} s/step"
            rows.append(Row(what, value))
            print(f"{what}: {value}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--step-probe"]:  # the child of `checkpointing_table`
        import json

        backbone, size, batch, checkpointing, steps = argv[1:6]
        figures = step_probe(backbone, int(size), int(batch), checkpointing == "1", int(steps))
        print(json.dumps(figures))
        return 0
    if argv[:1] == ["--checkpointing"]:  # bench/memory.py --checkpointing [backbone size b...]
        rest = argv[1:]
        backbone = rest[0] if rest else "tf_efficientnetv2_s"
        size = int(rest[1]) if len(rest) > 1 else 384
        batches = [int(b) for b in rest[2:]] or [2, 4, 8]
        print(f"VisionCare gradient-checkpointing benchmark — {machine_line()}\n", flush=True)
        print_table(checkpointing_table(backbone, size, batches, steps=2))
        return 0
    args = parse_args(argv)
    began = time.perf_counter()
    print(f"VisionCare memory benchmark — {machine_line()}\n", flush=True)
    if not Path("/proc/self/smaps_rollup").exists():
        print("This benchmark reads /proc/<pid>/smaps_rollup (Linux); nothing measured.")
        return 0
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as name:
        defaults = compose_config("train", [], Path(name) / "unused")
        model, data = args.backbone or defaults.model.backbone, defaults.data
        for extra_size in [None, *args.image_size]:
            figures = train_run(Path(name), extra_size, args)
            what = f"{model} {extra_size or data.image_size} px b{data.batch_size}"
            if extra_size is None:
                what += " (the defaults)"
            rows.append(Row(f"Training process peak RSS, {what}", f"{figures['rss_mb']:.0f} MiB"))
            rows.append(
                Row(
                    f"Whole run peak PSS ({figures['processes']:.0f} processes), {what}",
                    f"{figures['tree_pss_mb']:.0f} MiB",
                )
            )
            if "gpu_peak_mb" in figures:
                allocated = f"{figures['gpu_peak_mb']:.0f} MiB"
                reserved = f"{figures.get('gpu_reserved_mb', float('nan')):.0f} MiB"
                name = f"Peak GPU memory allocated / reserved, {what}"
                rows.append(Row(name, f"{allocated} / {reserved}"))
    print_table(rows)
    save_rows(args.json, "Memory", rows)
    print(
        f"\nEvery layer trainable (unfreeze_step=0), {args.batches} batches per run, "
        f"{os.cpu_count()} CPUs. Total {time.perf_counter() - began:.0f} s."
    )
    return 0  # a report: never enforced through the exit status


if __name__ == "__main__":
    raise SystemExit(main())
