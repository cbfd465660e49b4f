"""Run every benchmark (`make bench`), then print one summary of all budgets.

Each benchmark runs in its own process, one after the other, so none of them measures while
another holds the cores, and peak-memory figures start from a fresh interpreter. Their full
reports stream through as they run; the summary at the end repeats every row that has a budget.
A report, not a test: exits 0 even when a budget fails (a benchmark that crashes exits 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import Row, machine_line, print_table

HERE = Path(__file__).resolve().parent
# Data feeding first (it sizes everything else), then training, inference,
# Grad-CAM, memory, and the fundus crop every photo goes through.
BENCHMARKS = ("data_loading", "training_speed", "inference", "gradcam", "memory", "fundus_crop")
# `--smoke`: the smallest settings that still run every code path (timm's test_efficientnet, tiny
# images, one or two steps). The figures mean nothing; tests/test_bench.py uses it so `make bench`
# cannot silently break.
SMOKE_ARGS = {
    "data_loading": "--backbone test_efficientnet --images 2 --epoch-size 8 --steps 1 --workers 1",
    "training_speed": (
        "--backbone test_efficientnet --image-size 32 --batch-size 4 --warmup 1 --steps 2 "
        "--workers 0 --recipe-size 32 --recipe-batch 2 --recipe-steps 1 --emulated-bf16-batch 2"
    ),
    "inference": (
        "--backbone test_efficientnet --image-size 32 --batch-size 2 --images 4 --render-size 128 "
        "--workers 0 --rounds 1"
    ),
    "gradcam": (
        "--backbone test_efficientnet --image-size 32 --batch-size 2 --images 3 "
        "--photo-width 400 --overlay-size 64 --rounds 1"
    ),
    "memory": "--backbone test_efficientnet --batches 1 --num-train 20",
    "fundus_crop": "--width 640 --height 426 --rounds 1",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run all benchmarks and summarise the budgets.")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        default=list(BENCHMARKS),
        help="run these benchmarks only (default: all)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings: checks that everything runs (seconds)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    failed: list[str] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="visioncare-bench-") as tmp:
        results = Path(tmp) / "rows.jsonl"
        for name in args.only:
            print(f"\n{'=' * 30} bench/{name}.py {'=' * 30}", flush=True)
            start = time.perf_counter()
            command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(results)]
            if args.smoke:
                command += SMOKE_ARGS[name].split()
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(name)
            seconds[name] = time.perf_counter() - start
        reports = (
            [json.loads(line) for line in results.read_text().splitlines()]
            if (results.exists())
            else []
        )

    budgeted = [
        Row(f"{report['title']}: {row['name']}", row["result"], row["target"], row["passed"])
        for report in reports
        for row in report["rows"]
        if row["target"]
    ]
    print(f"\n{'=' * 30} summary {'=' * 30}")
    print(machine_line() + "\n")
    if budgeted:
        print_table(budgeted)
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    print(f"\nWall time {time.perf_counter() - began:.0f} s ({timing}).")
    if failed:
        print(f"Crashed: {', '.join(failed)} (see their output above).")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
