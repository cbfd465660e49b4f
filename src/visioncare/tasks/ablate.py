"""The ablation behind `src/ablate.py`: recipe arms × seeds, each a normal training run.

Every job is `python src/train.py <common overrides> <arm overrides> seed=<s>` in its own run
directory (`<ablation dir>/runs/<arm>/seed_<s>`), one after the other, so jobs share the
generated data set and the preprocessing cache (the first job builds them, the rest reuse them)
and a crashed job costs its own row only: it is reported with its exit code and last error
line, and the ablation goes on.

Written to the ablation directory:

- `ablation.csv`: one row per job (arm, seed, status, the metrics below, wall and training time).
- `ablation.md`: per arm and metric, mean ± standard deviation over seeds with a 95 % t-interval
  of the mean, and the paired difference to the baseline arm (same seeds) with its t-interval.
- `plots/val_curves.png`: validation avg accuracy per epoch, one colour per arm (thin: seeds,
  thick: their mean).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from visioncare.composition import compose_config, composition_error_message
from visioncare.errors import ConfigurationError, VisionCareError
from visioncare.utils.formatting import fmt_interval, fmt_number

log = logging.getLogger("visioncare")

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"  # src/train.py
CONF_DIR = TRAIN_SCRIPT.parents[1] / "conf"  # what train.py composes from
# Column in ablation.csv -> (where in summary.json, label in ablation.md).
METRICS = {
    "val_avg_acc": (("best", "val/avg_acc"), "val avg_acc"),
    "val_joint_acc": (("best", "val/joint_acc"), "val joint_acc"),
    "test_avg_acc": (("test", "test/avg_acc"), "test avg_acc"),
    "test_joint_acc": (("test", "test/joint_acc"), "test joint_acc"),
    "test_qwk_dr": (("test", "test/qwk_dr"), "test QWK DR"),
    "train_s": (None, "training time (s)"),
}
CSV_COLUMNS = ["arm", "seed", "status", "best_epoch", *METRICS, "wall_s", "run_dir", "error"]


class AblationFailedError(VisionCareError):
    """Every job of the ablation failed (there is nothing to compare)."""


@dataclass
class Job:
    """One training run of the ablation and, once run, what it gave."""

    arm: str
    seed: int
    overrides: list[str]
    run_dir: Path
    status: str = "pending"
    error: str = ""
    wall_s: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/avg_acc)


def plan_jobs(cfg: DictConfig, output_dir: Path) -> list[Job]:
    """Arms × seeds, in seed-major order (every arm gets seed 0 before any gets seed 1)."""
    arms = OmegaConf.to_container(cfg.arms, resolve=True) if cfg.get("arms") else {}
    only = [str(a) for a in cfg.get("only") or []]
    unknown = [a for a in only if a not in arms]
    if unknown:
        raise ConfigurationError(f"only={only}: no arm(s) {unknown}; the arms are {sorted(arms)}")
    if only:
        arms = {name: overrides for name, overrides in arms.items() if name in only}
    if not arms:
        raise ConfigurationError("ablation: `arms` is empty; give at least the baseline arm")
    if cfg.baseline not in arms:
        raise ConfigurationError(
            f"baseline={cfg.baseline!r} is not one of the arms {sorted(arms)}; "
            "set baseline=<arm name> (and keep it in `only`)"
        )
    for name, overrides in arms.items():
        if overrides is not None and not isinstance(overrides, list):
            raise ConfigurationError(
                f"arms.{name} must be a list of train.py overrides, got {overrides!r}"
            )
    seeds = [int(s) for s in cfg.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigurationError(f"seeds must be distinct integers, got {list(cfg.seeds)}")
    shared = _shared_overrides(cfg)
    jobs = []
    for seed in seeds:
        for arm, overrides in arms.items():
            run_dir = output_dir / "runs" / arm / f"seed_{seed}"
            extra = [str(o) for o in overrides or []]
            job_overrides = [*shared, *extra, f"seed={seed}", f"hydra.run.dir={run_dir}"]
            jobs.append(Job(arm, seed, job_overrides, run_dir))
    return jobs


def check_arms(cfg: DictConfig, jobs: Sequence[Job]) -> None:
    """Compose every arm's train config as `train.py` will, before any job runs.

    A bad override (a typo in a key, a group option that does not exist) would otherwise be
    found only when the first job of its arm starts, possibly hours in. The shared overrides
    are composed alone first, so a mistake there is not blamed on the first arm.
    """
    firsts: dict[str, Job] = {}
    for job in jobs:
        firsts.setdefault(job.arm, job)
    checks = [("the shared overrides", "common or extra", _shared_overrides(cfg))]
    checks += [(f"arm {arm!r}", f"arms.{arm}", job.overrides) for arm, job in firsts.items()]
    for what, where, overrides in checks:
        try:
            compose_config(CONF_DIR, "train", [o for o in overrides if not o.startswith("hydra.")])
        except (ConfigCompositionException, OverrideParseException) as error:
            raise ConfigurationError(
                f"ablation: train.py cannot compose {what}: "
                f"{composition_error_message(error, 'train.py')} (fix {where}, then rerun)"
            ) from error


def _shared_overrides(cfg: DictConfig) -> list[str]:
    """What every job gets: this ablation's paths, then `common`, then `extra`."""
    return [
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={cfg.paths.cache_dir}",
        f"paths.log_dir={cfg.paths.log_dir}",
        *(str(o) for o in [*(cfg.get("common") or []), *(cfg.get("extra") or [])]),
    ]


def run_job(job: Job, timeout_s: float | None = None) -> Job:
    """Run one training job; its output goes to `<run_dir>/job.log`."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = job.run_dir / "job.log"
    command = [sys.executable, str(TRAIN_SCRIPT), *job.overrides]
    log.info("[%s seed=%d] running, log: %s", job.arm, job.seed, log_path)
    start = time.perf_counter()
    with log_path.open("w") as handle:
        try:
            result = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s, env=os.environ
            )
            returncode: int | None = result.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    job.wall_s = time.perf_counter() - start
    if returncode == 0:
        collect_results(job)
    else:
        job.status = "timeout" if returncode is None else f"failed (exit {returncode})"
        job.error = _last_error(log_path)
        log.warning(
            "[%s seed=%d] %s: %s (see %s)", job.arm, job.seed, job.status, job.error, log_path
        )
    return job


def _last_error(log_path: Path) -> str:
    """The job's `ERROR:` line, else its last line naming an error, else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("ERROR:")]
    named = [line for line in lines if "Error" in line and "HYDRA_FULL_ERROR" not in line]
    return (errors or named or lines or ["no output"])[-1][:300]


def collect_results(job: Job) -> Job:
    """Metrics from the job's summary.json and its validation curve from metrics.csv."""
    summary_path = job.run_dir / "summary.json"
    if not summary_path.is_file():
        job.status, job.error = "failed (no summary.json)", ""
        return job
    summary = json.loads(summary_path.read_text())
    for column, (where, _) in METRICS.items():
        if where is not None:
            value = summary.get(where[0], {}).get(where[1])
            job.metrics[column] = math.nan if value is None else float(value)
    job.best_epoch = summary.get("best", {}).get("epoch")
    train_s, curve = 0.0, []
    metrics_csv = job.run_dir / "metrics.csv"
    if metrics_csv.is_file():
        with metrics_csv.open(newline="") as handle:
            for row in csv.DictReader(handle):
                train_s += _float(row.get("time/epoch_s"), 0.0)
                value = _float(row.get("val/avg_acc"))
                if not math.isnan(value):
                    curve.append((int(float(row["epoch"])), value))
    job.metrics["train_s"] = train_s
    job.curve = curve
    job.status = "ok"
    return job


def _float(text: str | None, default: float = math.nan) -> float:
    try:
        return float(text) if text not in (None, "") else default
    except ValueError:
        return default


# --------------------------------------------------------------------------- statistics


def mean_interval(
    values: Sequence[float], level: float = 0.95
) -> tuple[float, float, float, float]:
    """(mean, sample std, CI low, CI high): Student-t interval of the mean over seeds.

    NaN where undefined (no value; std and interval need two).
    """
    finite = [v for v in values if not math.isnan(v)]
    n = len(finite)
    if n == 0:
        return (math.nan,) * 4
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def paired_differences(jobs: Sequence[Job], arm: str, baseline: str, column: str) -> list[float]:
    """arm − baseline per seed, over the seeds where both finished."""
    by_seed = {(j.arm, j.seed): j.metrics.get(column, math.nan) for j in jobs if j.status == "ok"}
    seeds = sorted({j.seed for j in jobs})
    return [
        by_seed[(arm, s)] - by_seed[(baseline, s)]
        for s in seeds
        if (arm, s) in by_seed and (baseline, s) in by_seed
    ]


# --------------------------------------------------------------------------- outputs


def write_csv(path: Path, jobs: Sequence[Job]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for job in jobs:
            row: dict[str, Any] = {
                "arm": job.arm,
                "seed": job.seed,
                "status": job.status,
                "best_epoch": "" if job.best_epoch is None else job.best_epoch,
                "wall_s": f"{job.wall_s:.1f}",
                "run_dir": str(job.run_dir),
                "error": job.error,
            }
            for column in METRICS:
                value = job.metrics.get(column, math.nan)
                row[column] = "" if math.isnan(value) else f"{value:.6g}"
            writer.writerow(row)


def write_markdown(
    path: Path,
    jobs: Sequence[Job],
    arms: Sequence[str],
    baseline: str,
    facts: dict[str, str],
    level: float = 0.95,
) -> None:
    """ablation.md: a table per metric (arms as rows), then the failed jobs."""
    pct = f"{level:.0%}"
    lines = ["# VisionCare ablation", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    for column, (_, label) in METRICS.items():
        digits = 1 if column == "train_s" else 3
        lines += ["", f"## {label}", ""]
        lines.append(
            f"| arm | runs | mean ± std | {pct} CI of the mean | Δ vs {baseline} (paired) "
            f"| {pct} CI of Δ |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        for arm in arms:
            values = [j.metrics.get(column, math.nan) for j in jobs if j.arm == arm]
            values = [v for v in values if not math.isnan(v)]
            mean, std, low, high = mean_interval(values, level)
            if arm == baseline:
                delta_text, delta_ci = "—", "—"
            else:
                delta, _, d_low, d_high = mean_interval(
                    paired_differences(jobs, arm, baseline, column), level
                )
                delta_text = fmt_number(delta, digits, signed=True)
                delta_ci = fmt_interval(d_low, d_high, digits, signed=True)
            spread = f"{fmt_number(mean, digits)} ± {fmt_number(std, digits)}"
            interval = fmt_interval(low, high, digits)
            lines.append(
                f"| {arm} | {len(values)} | {spread} | {interval} | {delta_text} | {delta_ci} |"
            )
    failed = [j for j in jobs if j.status != "ok"]
    lines += ["", "## Jobs that did not finish", ""]
    if failed:
        lines += ["| arm | seed | status | error | log |", "|---|---:|---|---|---|"]
        for job in failed:
            error = job.error.replace("|", "\\|")
            lines.append(
                f"| {job.arm} | {job.seed} | {job.status} | {error} | {job.run_dir / 'job.log'} |"
            )
    else:
        lines.append("None.")
    lines += ["", "Plot: plots/val_curves.png (validation avg_acc per epoch; thick = mean)."]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(path: Path, jobs: Sequence[Job], arms: Sequence[str]) -> Path | None:
    """Validation avg accuracy per epoch per arm: thin lines per seed, a thick mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [j for j in jobs if j.status == "ok" and j.curve]
    if not finished:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")
    for index, arm in enumerate(arms):
        runs = [j for j in finished if j.arm == arm]
        if not runs:
            continue
        colour = colours(index % 10)
        by_epoch: dict[int, list[float]] = {}
        for job in runs:
            epochs, values = zip(*job.curve, strict=True)
            ax.plot(epochs, values, color=colour, alpha=0.3, linewidth=1)
            for epoch, value in job.curve:
                by_epoch.setdefault(epoch, []).append(value)
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        ax.plot(epochs, means, color=colour, linewidth=2.5, label=f"{arm} (n={len(runs)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val/avg_acc")
    ax.set_title("Validation accuracy per arm")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- task


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every arm × seed, then write ablation.csv, ablation.md and the curves plot."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(cfg, output_dir)
    check_arms(cfg, jobs)
    arms = list(dict.fromkeys(job.arm for job in jobs))
    timeout = cfg.get("job_timeout_s")
    level = float(cfg.get("level", 0.95))
    log.info("Ablation: %d arm(s) × %d seed(s) = %d jobs", len(arms), len(cfg.seeds), len(jobs))
    start = time.perf_counter()
    for job in jobs:
        run_job(job, None if timeout is None else float(timeout))
        write_csv(output_dir / "ablation.csv", jobs)  # after every job: partial results survive
    elapsed = time.perf_counter() - start
    finished = sum(j.status == "ok" for j in jobs)
    facts = {
        "command": "python src/ablate.py " + " ".join(_own_overrides()),
        "common overrides": " ".join(
            str(o) for o in [*(cfg.get("common") or []), *(cfg.get("extra") or [])]
        )
        or "(none)",
        "arms": "; ".join(
            f"{arm}: {' '.join(str(o) for o in cfg.arms[arm] or []) or '(the recipe)'}"
            for arm in arms
        ),
        "seeds": ", ".join(str(s) for s in cfg.seeds),
        "jobs": f"{finished} of {len(jobs)} finished",
        "wall time": f"{elapsed / 60:.1f} min",
        "intervals": f"Student-t {level:.0%} over seeds; Δ paired by seed",
    }
    plot_curves(output_dir / "plots" / "val_curves.png", jobs, arms)
    write_markdown(output_dir / "ablation.md", jobs, arms, str(cfg.baseline), facts, level)
    log.info("Ablation (%d/%d jobs finished) written to %s", finished, len(jobs), output_dir)
    if not finished:
        raise AblationFailedError(
            f"none of the {len(jobs)} ablation jobs finished; their errors are in "
            f"{output_dir / 'ablation.md'} and each job's job.log"
        )
    return {"output_dir": str(output_dir), "jobs": len(jobs), "finished": finished}


def _own_overrides() -> list[str]:
    """The command-line overrides of this ablate.py run (for the report)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (e.g. called from a test)
        return []
