"""What an Optuna search leaves in its directory: `optuna_summary.json`/`.md` and two plots."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna

from visioncare.scoring.plots import plot_param_importances, plot_search_history

log = logging.getLogger("visioncare")


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial as plain data: number, state, value, parameters, last reported score, run dir."""
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    reported = None if last is None else {"epoch": last, "value": trial.intermediate_values[last]}
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        # Optuna gives a pruned trial its last reported score as value: not a final one.
        "value": trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
        "params": trial.params,
        "last_reported": reported,
        "run_dir": trial.user_attrs.get("run_dir"),
    }


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """Optuna's default importances (PED-ANOVA) over the completed trials, or None and why."""
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 completed trials ({len(complete)} so far)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few-trial warnings: the note below says it
            return dict(optuna.importance.get_param_importances(study)), ""
    except (RuntimeError, ValueError) as error:
        return None, str(error)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    lines = [
        f"# Optuna study `{summary['study_name']}`",
        "",
        f"Storage: `{summary['storage']}`. Maximises the best `{metric}` of each trial.",
        "Trials: " + ", ".join(f"{n} {state}" for state, n in summary["counts"].items()) + ".",
        "",
    ]
    best = summary["best"]
    if best:
        lines += [
            f"## Best trial: {best['number']} ({metric} = {best['value']:.4f})",
            "",
            *[f"- `{k}` = {_cell(v)}" for k, v in best["params"].items()],
            f"- run directory: `{best['run_dir']}`",
            "",
        ]
    names = sorted({k for t in summary["trials"] for k in t["params"]})
    header = ["trial", "state", metric, "last reported (epoch: value)", *names]
    lines += ["## Trials", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in summary["trials"]:
        last = t["last_reported"]
        reported = f"{last['epoch']}: {last['value']:.4f}" if last else "—"
        row = [t["number"], t["state"], _cell(t["value"]), reported]
        lines.append("| " + " | ".join(map(str, row + [_cell(t["params"].get(n)) for n in names])))
        lines[-1] += " |"
    lines += ["", "## Parameter importances", ""]
    if summary["importances"]:
        lines += [f"- `{k}`: {v:.3f}" for k, v in summary["importances"].items()]
        lines += ["", "![importances](plots/param_importances.png)"]
    else:
        lines.append(f"Not computed: {summary['importances_note']}.")
    return "\n".join(lines) + "\n"


def write_search_summary(
    study: optuna.Study,
    search_dir: Path,
    metric: str,
    storage: str,
    with_importances: bool = True,
) -> dict[str, Any]:
    """`optuna_summary.json` and `.md`, `plots/search_history.png` and, with importances,
    `plots/param_importances.png`; returns the summary (best = None before any trial completed).
    """
    trials = [trial_record(t) for t in study.trials]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["value"]) if complete else None
    importances, note = param_importances(study) if with_importances else (None, "not yet")
    summary = {
        "study_name": study.study_name,
        "storage": storage,
        "metric": metric,
        "direction": "maximize",
        "counts": counts,
        "best": best,
        "importances": importances,
        "importances_note": note,
        "trials": trials,
    }
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / "optuna_summary.json").write_text(json.dumps(summary, indent=2))
    (search_dir / "optuna_summary.md").write_text(_markdown(summary))
    plot_search_history(trials, metric, search_dir / "plots" / "search_history.png")
    if importances:
        plot_param_importances(importances, metric, search_dir / "plots" / "param_importances.png")
    return summary
