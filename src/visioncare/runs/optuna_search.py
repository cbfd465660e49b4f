"""Hyperparameter search with Optuna's own API: `python src/train.py hparams_search=optuna`.

The study (TPE sampler, median pruner, both from `optuna.*` in the config) maximises each trial's
best `optimized_metric` (`val/avg_acc`). A trial is the config the entry point received, without
the `optuna` node, with the trial's sampled values set on the keys the space names and its own
run directory `<search dir>/trials/<number>/`: what `python src/train.py <same overrides>
<key>=<value> ...` trains. It runs in this process through the training function the task hands
in (library modules never import tasks), with one extra callback that reports the validation
score per epoch and prunes. The study lives in a storage (default: sqlite in the search
directory), so running the same command again continues it up to `optuna.n_trials` finished
trials.

Hydra's optuna sweeper plugin is not used: it asks each job for its final value only (no
pruning) and pins an old Optuna.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from visioncare.callbacks.optuna_pruning import OptunaPruning
from visioncare.errors import (
    ConfigurationError,
    DataValidationError,
    VisionCareError,
    check_int_at_least,
)
from visioncare.runs.optuna_report import trial_record, write_search_summary

log = logging.getLogger("visioncare")

# A training run: the composed config and extra Lightning callbacks in, its metrics out.
TrainFn = Callable[[DictConfig, Sequence[Callback]], dict[str, float]]

SPACE_FIELDS = {
    "float": {"key", "type", "low", "high", "log", "step"},
    "int": {"key", "type", "low", "high", "log", "step"},
    "categorical": {"key", "type", "choices"},
}
# Trials that count towards `optuna.n_trials`; a failed or interrupted trial is tried again.
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
_ABSENT = object()


class SearchFailedError(VisionCareError):
    """No trial of this search finished: the first error says why."""


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: its name in the study, the config key it sets, its range."""

    name: str
    key: str
    distribution: BaseDistribution


def parse_space(space: DictConfig | None, cfg: DictConfig) -> list[Param]:
    """`optuna.space` as Optuna distributions; every mistake names `optuna.space.<name>`.

    Each entry is ``{key: <config key>, type: float|int|categorical, low, high, [log], [step]}``
    or ``{key, type: categorical, choices: [...]}``. The key must be a value that exists in the
    composed config (not a section or a config group), so a typo never searches nothing.
    """
    if not space:
        raise ConfigurationError("optuna.space is empty: give at least one hyperparameter")
    params = []
    for name, entry in space.items():
        where = f"optuna.space.{name}"
        if not isinstance(entry, DictConfig):
            raise ConfigurationError(f"{where} must be a mapping {{key, type, ...}}, got {entry!r}")
        spec = OmegaConf.to_container(entry, resolve=True)
        kind = spec.get("type")
        if kind not in SPACE_FIELDS:
            raise ConfigurationError(
                f"{where}.type={kind!r} is not a distribution; use one of {sorted(SPACE_FIELDS)}"
            )
        unknown = sorted(set(spec) - SPACE_FIELDS[kind])
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown field(s) {unknown} for type {kind}; "
                f"allowed: {sorted(SPACE_FIELDS[kind])}"
            )
        key = spec.get("key")
        if not key:
            raise ConfigurationError(f"{where}.key is missing: name the config key it sets")
        current = OmegaConf.select(cfg, str(key), default=_ABSENT)
        if current is _ABSENT:
            raise ConfigurationError(
                f"{where}.key={key} is not a key of the training config; check its spelling "
                "(all keys: `python src/train.py --cfg job`) or remove the entry with "
                f"~{where}"
            )
        if isinstance(current, DictConfig | ListConfig):
            raise ConfigurationError(
                f"{where}.key={key} is a config section, not a value: search one of its values"
            )
        try:
            if kind == "categorical":
                distribution: BaseDistribution = CategoricalDistribution(spec["choices"])
            else:
                cls = FloatDistribution if kind == "float" else IntDistribution
                bounds = {k: spec[k] for k in ("low", "high") if k in spec}
                if len(bounds) < 2:
                    raise ValueError("needs both `low` and `high`")
                extra = {k: spec[k] for k in ("log", "step") if spec.get(k) is not None}
                distribution = cls(**bounds, **extra)
        except (KeyError, ValueError, TypeError) as error:
            raise ConfigurationError(f"{where}: not a valid {kind} range: {error}") from None
        params.append(Param(str(name), str(key), distribution))
    return params


def suggest(trial: optuna.Trial, param: Param) -> Any:
    """The trial's value for ``param``, through Optuna's public `suggest_*` methods."""
    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(param.name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(param.name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(param.name, d.low, d.high, step=d.step, log=d.log)


def storage_url(storage: str | None, search_dir: Path) -> str:
    """An RDB URL: the given one, a file path as sqlite, or `<search dir>/study.db`."""
    if not storage:
        return f"sqlite:///{(search_dir / 'study.db').resolve()}"
    if "://" in str(storage):
        return str(storage)
    path = Path(str(storage)).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def check_search(cfg: DictConfig) -> list[Param]:
    """Everything a search needs from the config, checked before any trial trains."""
    search = cfg.optuna
    check_int_at_least(search.get("n_trials"), "optuna.n_trials")
    if cfg.get("ckpt_path"):
        raise ConfigurationError(
            f"ckpt_path={cfg.ckpt_path} cannot be combined with hparams_search=optuna: a search "
            "resumes from its storage (run the same command again), not from a checkpoint"
        )
    if "ddp" in str(cfg.trainer.get("strategy") or ""):
        raise ConfigurationError(
            f"trainer.strategy={cfg.trainer.strategy} cannot run inside an Optuna search (trials "
            "run in this process); search on a single device"
        )
    if not cfg.get("optimized_metric"):
        raise ConfigurationError("optimized_metric is empty: name the metric the search maximises")
    return parse_space(search.get("space"), trial_base(cfg))


def trial_base(cfg: DictConfig) -> DictConfig:
    """The training config every trial starts from: the received one without `optuna`."""
    base = copy.deepcopy(cfg)
    with open_dict(base):
        base.pop("optuna", None)
    return base


def command_overrides() -> list[str]:
    """The command line's overrides, minus those that select or configure the search."""
    if not HydraConfig.initialized():
        return []
    return [
        o
        for o in HydraConfig.get().overrides.task
        if not o.startswith(("hparams_search=", "optuna.", "+optuna.", "~optuna."))
    ]


def trial_config(base: DictConfig, params: list[Param], values: dict[str, Any], run_dir: Path):
    """``base`` with the trial's values set and its own run directory; stored as `.hydra/`.

    The `.hydra/config.yaml` and `overrides.yaml` in the trial directory read like those of
    `python src/train.py` run with the same overrides, so sweep tools and people read a trial
    like any other run.
    """
    cfg = copy.deepcopy(base)
    overrides = command_overrides()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        for param in params:
            OmegaConf.update(cfg, param.key, values[param.name], merge=False)
            overrides.append(f"{param.key}={values[param.name]}")
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    return cfg


def open_study(cfg: DictConfig, search_dir: Path) -> tuple[optuna.Study, str]:
    """Create the study, or load it from its storage; the sampler seeded past its old trials.

    A resumed study's sampler is seeded with `optuna.seed` + the number of trials already in the
    study: the same seed again would replay the first random (startup) proposals.
    """
    search = cfg.optuna
    url = storage_url(search.get("storage"), search_dir)
    # Heartbeats: a trial whose process was killed is marked failed when the study is next
    # opened (after the grace period), then tried again. Stable since Optuna 2; still flagged.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(
        study_name=str(search.study_name),
        storage=storage,
        direction="maximize",
        pruner=instantiate(search.pruner),
        load_if_exists=True,
    )
    study.sampler = instantiate(search.sampler, seed=int(search.seed) + len(study.trials))
    log.info("Optuna study %r in %s (%d trials so far)", study.study_name, url, len(study.trials))
    return study, url


def run_search(cfg: DictConfig, train: TrainFn) -> dict[str, float]:
    """Run the study until `optuna.n_trials` trials have finished; write its summary.

    Returns the best trial's metrics (its value under `optimized_metric`), like one training run.
    """
    params = check_search(cfg)
    search_dir = Path(cfg.paths.output_dir)
    search_dir.mkdir(parents=True, exist_ok=True)
    study, url = open_study(cfg, search_dir)
    base = trial_base(cfg)
    metric = str(cfg.optimized_metric)
    errors: list[str] = []
    # The command's own mistakes (a config key, the data), not the sampled values': every trial
    # would fail the same way, so the study stops and the error is the command's one ERROR line.
    command_errors: list[VisionCareError] = []

    def objective(trial: optuna.Trial) -> float:
        values = {p.name: suggest(trial, p) for p in params}
        run_dir = search_dir / "trials" / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        log.info("Trial %d: %s (run directory %s)", trial.number, values, run_dir)
        trial_cfg = trial_config(base, params, values, run_dir)
        try:
            metrics = train(trial_cfg, [OptunaPruning(trial, metric)])
        except optuna.TrialPruned:
            raise
        except (ConfigurationError, DataValidationError) as error:
            command_errors.append(error)
            trial.study.stop()
            raise
        except Exception as error:
            # A failed trial must not end the study: `optimize` logs it with its traceback,
            # marks it failed and goes on (catch=Exception below).
            errors.append(f"trial {trial.number}: {type(error).__name__}: {error}")
            raise
        value = metrics.get(metric)
        if value is None or not math.isfinite(float(value)):
            errors.append(f"trial {trial.number}: no finite {metric} ({value})")
            raise ValueError(f"trial {trial.number} returned no finite {metric}")
        return float(value)

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_dir = Path(trial.user_attrs.get("run_dir", search_dir / "trials" / str(trial.number)))
        if run_dir.is_dir():
            (run_dir / "trial.json").write_text(json.dumps(trial_record(trial), indent=2))
        write_search_summary(study, search_dir, metric, url, with_importances=False)

    finished = sum(t.state in FINISHED for t in study.trials)
    remaining = max(int(cfg.optuna.n_trials) - finished, 0)
    log.info(
        "%d trials finished, %d to run (optuna.n_trials=%d)",
        finished,
        remaining,
        cfg.optuna.n_trials,
    )
    try:
        if remaining:
            study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[record])
    finally:
        summary = write_search_summary(study, search_dir, metric, url)
    if command_errors:
        raise command_errors[0]
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        first = errors[0] if errors else "every trial was pruned or failed"
        raise SearchFailedError(
            f"no trial of study {study.study_name!r} completed ({first}); see "
            f"{search_dir / 'optuna_summary.md'}"
        )
    best = summary["best"]
    log.info("Best trial %d: %s=%.4f %s", best["number"], metric, best["value"], best["params"])
    return {metric: best["value"]}
