"""One split's report metrics from its probabilities: the composition eval writes per dataset
and training's end-of-run test report (summary.json's `test_report`, the model card) both call,
so the card's numbers and eval's metrics.json for the same checkpoint cannot disagree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from visioncare.errors import ConfigurationError, check_int_at_least
from visioncare.scoring.bootstrap import Outcomes, outcomes_from_probs
from visioncare.scoring.report import (
    compute_metrics,
    gradable_metrics,
    subgroup_metrics,
    uncalibrated_metrics,
    uncertainty_metrics,
)


@dataclass(frozen=True)
class IntervalSettings:
    """The bootstrap and subgroup settings of a report (eval.yaml's `bootstrap`, `subgroups`).

    Attributes:
        resamples: bootstrap draws per interval.
        level: the intervals' coverage, a fraction in (0, 1).
        seed: seed of the draws (the same seed gives the same intervals).
        min_size: a subgroup below this many images is listed with its count only.
    """

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0
    min_size: int = 20

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], default_seed: int = 0) -> IntervalSettings:
        """The config's `bootstrap.{resamples,level,seed}` and `subgroups.min_size`, checked
        (a `ConfigurationError` naming the key); absent keys take the defaults above, and the
        seed ``default_seed``."""
        bootstrap = cfg.get("bootstrap") or {}
        resamples = check_int_at_least(
            bootstrap.get("resamples", cls.resamples), "bootstrap.resamples"
        )
        level = bootstrap.get("level", cls.level)
        if not isinstance(level, float) or not 0.0 < level < 1.0:
            raise ConfigurationError(
                f"bootstrap.level={level!r} is not allowed; give the intervals' coverage as a "
                "fraction in (0, 1), e.g. 0.95"
            )
        seed = check_int_at_least(bootstrap.get("seed", default_seed), "bootstrap.seed", 0)
        min_size = check_int_at_least(
            (cfg.get("subgroups") or {}).get("min_size", cls.min_size),
            "subgroups.min_size",
            minimum=0,
        )
        return cls(resamples, level, seed, min_size)


def score_split(
    probs: dict[str, Tensor],
    raw_probs: dict[str, Tensor],
    targets: dict[str, Tensor],
    source_ids: Tensor,
    source_names: list[str],
    records: list,
    prefix: str,
    thresholds: dict[str, float],
    settings: IntervalSettings,
    gradable: list[bool] | None = None,
) -> tuple[dict[str, Any], Outcomes]:
    """Every metric of one split under ``prefix``: point values, bootstrap intervals (patients
    resampled where known), per patient, calibration of ``probs`` (calibrated) and of
    ``raw_probs`` (`_uncalibrated`), subgroups and, with ``gradable`` (the photos' verdicts),
    the gradable subset and grouping. Returns the flat metrics and the outcomes."""
    resamples, seed, level = settings.resamples, settings.seed, settings.level
    metrics = compute_metrics(probs, targets, source_ids, source_names, prefix, thresholds)
    outcomes = outcomes_from_probs(
        {t: p.numpy() for t, p in probs.items()},
        {t: v.numpy() for t, v in targets.items()},
        thresholds,
    )
    patients = [r.group for r in records]
    metrics.update(uncertainty_metrics(outcomes, patients, prefix, resamples, seed, level))
    metrics.update(
        uncalibrated_metrics(raw_probs, targets, patients, prefix, resamples, seed, level)
    )
    if gradable is not None:
        metrics.update(
            gradable_metrics(outcomes, records, gradable, prefix, resamples, seed, level)
        )
    metrics.update(
        subgroup_metrics(
            outcomes,
            records,
            prefix,
            min_size=settings.min_size,
            resamples=resamples,
            seed=seed,
            level=level,
            gradable=gradable,
        )
    )
    return metrics, outcomes
