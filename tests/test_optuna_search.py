"""`hparams_search=optuna`: the search space, pruning, failures, resume and the summary."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from visioncare.callbacks.optuna_pruning import OptunaPruning
from visioncare.cli import run_task
from visioncare.errors import ConfigurationError
from visioncare.runs.optuna_search import parse_space, run_search
from visioncare.tasks.train import run as train

State = optuna.trial.TrialState


class PruneTrials(optuna.pruners.BasePruner):
    """Prunes the given trial numbers at their first report: one pruned trial by construction."""

    def __init__(self, numbers: Sequence[int]) -> None:
        self.numbers = set(numbers)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number in self.numbers


def search_cfg(make_cfg: Callable[..., DictConfig], *extra: str) -> DictConfig:
    return make_cfg("hparams_search=optuna", "logger=none", "gradcam_images=0", *extra)


def test_default_space_names_real_keys(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = search_cfg(make_cfg)
    params = {p.name: p for p in parse_space(cfg.optuna.space, cfg)}
    assert set(params) == {
        "lr", "weight_decay", "unfreeze_step", "backbone_lr_mult", "backbone_lr_decay",
        "dropout", "label_smoothing",
    }  # fmt: skip
    assert params["lr"].key == "model.optimizer.lr"
    assert params["lr"].distribution == optuna.distributions.FloatDistribution(1e-5, 3e-3, log=True)
    assert params["unfreeze_step"].distribution == optuna.distributions.IntDistribution(0, 3)
    assert isinstance(OmegaConf.select(cfg, "loss.label_smoothing"), float)
    # The configured sampler and pruner are real Optuna classes.
    from hydra.utils import instantiate

    assert isinstance(instantiate(cfg.optuna.pruner), optuna.pruners.MedianPruner)
    assert isinstance(instantiate(cfg.optuna.sampler, seed=0), optuna.samplers.TPESampler)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optuna.space.lr.key=model.optimizer.lrr", "optuna.space.lr.key=model.optimizer.lrr"),
        ("optuna.space.lr.type=normal", "optuna.space.lr.type='normal'"),
        ("optuna.space.dropout.low=0.9", "optuna.space.dropout: not a valid float range"),
        ("+optuna.space.lr.lower=0.1", "optuna.space.lr: unknown field(s) ['lower']"),
        ("optuna.space.dropout.key=model", "optuna.space.dropout.key=model is a config section"),
        ("optuna.n_trials=0", "optuna.n_trials=0"),
    ],
)
def test_bad_space_is_one_error_line(
    make_cfg: Callable[..., DictConfig],
    capsys: pytest.CaptureFixture[str],
    override: str,
    named: str,
) -> None:
    cfg = search_cfg(make_cfg, override)
    with pytest.raises(SystemExit) as exit_info:
        run_task(train, cfg)  # refused before any data is read or any trial starts
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and named in errors[0], errors
    assert not Path(cfg.optuna.storage).exists()


def test_failed_trial_is_recorded_and_the_study_goes_on(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """A trial that raises is marked failed; the next ones run; a resume retries it."""
    cfg = search_cfg(make_cfg, "optuna.n_trials=3")
    calls: list[float] = []
    dropouts: list[float] = []

    def fake_train(trial_cfg: DictConfig, callbacks: Sequence[object]) -> dict[str, float]:
        calls.append(trial_cfg.model.optimizer.lr)
        if len(calls) == 2:
            raise RuntimeError("out of memory (pretend)")
        dropouts.append(trial_cfg.model.dropout)
        return {"val/avg_acc": 0.5 + trial_cfg.model.dropout}

    result = run_search(cfg, fake_train)
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "optuna_summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "fail", "complete"]
    assert summary["best"]["value"] == result["val/avg_acc"] == max(0.5 + d for d in dropouts)
    assert "| 1 | fail |" in (out / "optuna_summary.md").read_text()
    # The same command again: the failed trial does not count, so one more trial runs.
    run_search(cfg, fake_train)
    assert len(calls) == 4
    run_search(cfg, fake_train)  # three finished: nothing to do
    assert len(calls) == 4
    study = optuna.load_study(study_name="visioncare", storage=f"sqlite:///{cfg.optuna.storage}")
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL, *[State.COMPLETE] * 2]
    # The resumed sampler does not replay the first proposals.
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4

    # A trial's config is what `python src/train.py <its .hydra/overrides.yaml>` composes.
    trial_dir = out / "trials" / "3"
    overrides = OmegaConf.to_container(OmegaConf.load(trial_dir / ".hydra" / "overrides.yaml"))
    composed = make_cfg("logger=none", "gradcam_images=0", *overrides)
    composed.paths.output_dir = str(trial_dir)
    saved = OmegaConf.load(trial_dir / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(saved)


def test_a_command_mistake_stops_the_study_with_its_own_error(
    make_cfg: Callable[..., DictConfig],
) -> None:
    """A config error is the command's, not the trial's: no retry of it n_trials times."""
    cfg = search_cfg(make_cfg, "optuna.n_trials=5")
    calls: list[int] = []

    def fake_train(trial_cfg: DictConfig, callbacks: Sequence[object]) -> dict[str, float]:
        calls.append(1)
        raise ConfigurationError("target_sensitivity=85 must be in (0, 1]")

    with pytest.raises(ConfigurationError, match="target_sensitivity=85"):
        run_search(cfg, fake_train)
    assert len(calls) == 1
    summary = json.loads((Path(cfg.paths.output_dir) / "optuna_summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["fail"]


def test_an_unlogged_optimized_metric_is_named_at_the_first_validation() -> None:
    """Otherwise pruning would silently never happen and every trial would fail at its end."""
    study = optuna.create_study(direction="maximize")
    pruning = OptunaPruning(study.ask(), "val/avg_accuracy")
    trainer = type("FakeTrainer", (), {})()
    trainer.sanity_checking = False
    trainer.state = type("State", (), {"fn": "fit"})()
    trainer.callback_metrics = {"val/avg_acc": torch.tensor(0.5), "train/loss": torch.tensor(1.0)}
    with pytest.raises(
        ConfigurationError, match=r"optimized_metric=val/avg_accuracy .*val/avg_acc"
    ):
        pruning.on_validation_end(trainer, None)
    trainer.sanity_checking = True
    pruning.on_validation_end(trainer, None)  # the sanity check is never judged


@pytest.mark.slow
def test_search_prunes_resumes_and_reaches_the_model(make_cfg: Callable[..., DictConfig]) -> None:
    """Three tiny trials (trial 1 pruned by construction), then a resume for a fourth."""
    cfg = search_cfg(make_cfg, "optuna.n_trials=3", "test=false", "trainer.max_epochs=2")
    with open_dict(cfg):
        cfg.optuna.pruner = {"_target_": f"{__name__}.PruneTrials", "numbers": [1]}
    out = Path(cfg.paths.output_dir)
    first = train(cfg)

    study = optuna.load_study(study_name="visioncare", storage=f"sqlite:///{cfg.optuna.storage}")
    assert [t.state for t in study.trials] == [State.COMPLETE, State.PRUNED, State.COMPLETE]
    pruned = study.trials[1]
    assert list(pruned.intermediate_values) == [0]  # pruned at its first epoch's report
    pruned_dir = out / "trials" / "1"
    assert (pruned_dir / "metrics.csv").read_text().count("\n") == 2  # header + epoch 0
    assert not (pruned_dir / "summary.json").exists()
    assert json.loads((pruned_dir / "trial.json").read_text())["state"] == "pruned"

    resumed = copy_cfg(cfg, n_trials=4)
    train(resumed)
    study = optuna.load_study(study_name="visioncare", storage=f"sqlite:///{cfg.optuna.storage}")
    assert len(study.trials) == 4 and study.trials[3].state == State.COMPLETE
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2", "3"]

    summary = json.loads((out / "optuna_summary.json").read_text())
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    assert [t["state"] for t in summary["trials"]] == ["complete", "pruned", "complete", "complete"]
    assert first["val/avg_acc"] <= study.best_value
    assert (out / "plots" / "search_history.png").is_file()
    assert summary["importances"] and (out / "plots" / "param_importances.png").is_file()
    assert f"Best trial: {study.best_trial.number}" in (out / "optuna_summary.md").read_text()

    # The sampled values are what each trial trained with: its config and its checkpoint.
    space = {p.name: p.key for p in parse_space(cfg.optuna.space, cfg)}
    for trial in study.trials:
        run_dir = out / "trials" / str(trial.number)
        saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert "optuna" not in saved
        assert saved.paths.output_dir == str(run_dir)
        for name, value in trial.params.items():
            assert OmegaConf.select(saved, space[name]) == value, (trial.number, name)
        # best.ckpt: every trial has one, the pruned one too (its epoch 0).
        ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["dropout"] == trial.params["dropout"]
        lrs = [g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
        assert lrs[0] == trial.params["lr"]  # the heads' group
        top_of_backbone = trial.params["lr"] * trial.params["backbone_lr_mult"]
        assert any(lr == pytest.approx(top_of_backbone) for lr in lrs)
        assert (
            ckpt["visioncare_config"]["loss"]["label_smoothing"] == trial.params["label_smoothing"]
        )


def copy_cfg(cfg: DictConfig, n_trials: int) -> DictConfig:
    """The same command again, with a larger study budget."""
    again = OmegaConf.create(OmegaConf.to_container(cfg))
    again.optuna.n_trials = n_trials
    return again
