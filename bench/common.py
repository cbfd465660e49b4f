"""Shared pieces of the benchmarks: the report table, the machine line, step timing, configs.

Every benchmark prints a table of measurements with, where the design sets one, a budget and a
PASS/FAIL verdict. Scripts run from the repository root (`python bench/<name>.py`), which puts
this folder on `sys.path`; that is also how Hydra finds `common.StepTimer` when a benchmark adds
it to the real training config.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from visioncare.utils.accelerator import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@dataclass
class Row:
    """One line of the report: a measurement, its result and, where there is one, its budget."""

    name: str
    result: str
    target: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


def print_table(rows: Sequence[Row]) -> None:
    """Rows as an aligned plain-text table (readable in a terminal and in CI logs)."""
    headers = ("Measurement", "Result", "Target", "")
    widths = [
        max(len(headers[0]), *(len(r.name) for r in rows)),
        max(len(headers[1]), *(len(r.result) for r in rows)),
        max(len(headers[2]), *(len(r.target) for r in rows)),
        4,
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line((row.name, row.result, row.target, row.verdict)))


def save_rows(path: str | Path | None, title: str, rows: Sequence[Row]) -> None:
    """Append a report's rows to a JSON-lines file (`run_all.py` prints them all at the end)."""
    if not path:
        return
    with Path(path).open("a") as handle:
        handle.write(json.dumps({"title": title, "rows": [asdict(r) for r in rows]}) + "\n")


def cpu_name() -> str:
    """The CPU model, so numbers from different machines are not compared by mistake."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU, cores, torch version/threads, native bf16 and the GPU if any: the report's header."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), native bf16: {cpu_has_native_bf16()}, GPU: {gpu}"
    )


def steady_rate(durations: Sequence[float], items_per_step: int) -> float:
    """Items per second from per-step wall times: the median step, robust to a stray hiccup."""
    return items_per_step / statistics.median(durations)


def ratio_row(name: str, ratio: float, target: float | None = None, note: str = "") -> Row:
    """A `N.NN×` row, with a `≥ target×` budget when one is given."""
    result = f"{ratio:.2f}×" + (f" ({note})" if note else "")
    if target is None:
        return Row(name, result)
    return Row(name, result, f"≥ {target:g}×", ratio >= target)


# Work a benchmark runs at the start of each training epoch, outside the timed spans: epoch → None.
# `training_speed.py` interleaves plain-loop runs with the project's epochs this way.
BETWEEN_EPOCHS: list[Callable[[int], None]] = []


class StepTimer(Callback):
    """Wall time of every training iteration, per epoch, written to ``path`` as JSON.

    An iteration is measured from one `on_train_batch_start` to the next, so it covers what a
    hand-written loop's iteration covers: forward, backward, clipping, the optimizer step,
    logging and callbacks, and fetching the next batch. The epoch's last batch has no successor
    and is left out; validation and checkpointing happen outside the measured spans. At each
    epoch start it first runs the benchmark's `BETWEEN_EPOCHS` work.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.starts: dict[int, list[float]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for work in list(BETWEEN_EPOCHS):
            work(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.setdefault(trainer.current_epoch, []).append(time.perf_counter())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        durations = {
            epoch: [b - a for a, b in itertools.pairwise(marks)]
            for epoch, marks in self.starts.items()
        }
        self.path.write_text(json.dumps(durations))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a training run's console output (Lightning's info lines, warnings, tables)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "visioncare")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_step_times(path: Path) -> dict[int, list[float]]:
    """`StepTimer`'s file: epoch → iteration wall times in seconds."""
    return {int(epoch): times for epoch, times in json.loads(path.read_text()).items()}


def scratch_run_overrides(tmp: Path) -> list[str]:
    """Overrides every benchmark's training run shares: data, cache and logs inside ``tmp``, no
    live progress bar (it would garble the report), no test pass and no Grad-CAM preview."""
    return [
        f"data.root={tmp / 'synthetic'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'logs'}",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "test=false",
        "gradcam_images=0",
    ]


def compose_config(config_name: str, overrides: Sequence[str], output_dir: Path) -> Any:
    """conf/<config_name>.yaml composed with ``overrides``, its run directory set to ``output_dir``.

    The same composition the entry points (`src/train.py`, `src/export.py`...) perform, without
    Hydra's process-level run-directory handling, so a benchmark runs the real task in-process.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from visioncare.config import register_resolvers

    os.environ.setdefault("VISIONCARE_ROOT", str(ROOT))
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg
