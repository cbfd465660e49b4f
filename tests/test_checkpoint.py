"""BestAverageAccuracy: selection by val/avg_acc, ties by mean macro-F1, state survives resume."""

import math
from types import SimpleNamespace

import pytest
import torch

from visioncare.callbacks.checkpoint import BestAverageAccuracy, save_checkpoint_atomically
from visioncare.errors import TrainingDivergedError
from visioncare.models.module import VisionCareModule


class _Trainer:
    """The few Trainer attributes the callback reads."""

    def __init__(self) -> None:
        self.sanity_checking = False
        self.state = SimpleNamespace(fn="fit")
        self.current_epoch = 0
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.is_global_zero = True
        self.strategy = SimpleNamespace(
            barrier=lambda name=None: None,
            reduce_boolean_decision=lambda decision, all=True: decision,
            remove_checkpoint=lambda path: None,
        )
        self.fast_dev_run = False
        self.loggers: list = []
        self.saved: list[int] = []

    @property
    def global_step(self) -> int:
        return self.current_epoch + 1  # one step per epoch: a new step at every validation

    def save_checkpoint(self, path, weights_only: bool = False) -> None:
        path.write_text(str(self.current_epoch))
        self.saved.append(self.current_epoch)


def _epoch(trainer, cb, epoch, avg, f1_dr, f1_dme):
    trainer.current_epoch = epoch
    trainer.callback_metrics = {
        "val/avg_acc": torch.tensor(avg),
        "val/f1_dr": torch.tensor(f1_dr),
        "val/f1_dme": torch.tensor(f1_dme),
    }
    cb.on_validation_end(trainer, None)


def test_selects_best_average_accuracy_with_f1_tiebreak(tmp_path):
    cb, trainer = BestAverageAccuracy(dirpath=str(tmp_path)), _Trainer()
    _epoch(trainer, cb, 0, 0.50, 0.3, 0.3)
    _epoch(trainer, cb, 1, 0.60, 0.2, 0.2)  # better accuracy
    _epoch(trainer, cb, 2, 0.55, 0.9, 0.9)  # worse accuracy, better F1: not selected
    _epoch(trainer, cb, 3, 0.60, 0.4, 0.4)  # tie on accuracy, better F1: selected
    _epoch(trainer, cb, 4, 0.60, 0.1, 0.1)  # tie, worse F1
    _epoch(trainer, cb, 5, float("nan"), 1.0, 1.0)  # NaN never wins
    assert trainer.saved == [0, 1, 3]
    assert cb.best_epoch == 3 and math.isclose(cb.best_score, 0.60, rel_tol=1e-6)
    assert (tmp_path / "best.ckpt").read_text() == "3"
    assert cb.best_model_path == str(tmp_path / "best.ckpt")


def test_state_dict_round_trip_keeps_best_after_resume(tmp_path):
    cb, trainer = BestAverageAccuracy(dirpath=str(tmp_path)), _Trainer()
    _epoch(trainer, cb, 0, 0.7, 0.5, 0.5)
    resumed = BestAverageAccuracy(dirpath=str(tmp_path))
    resumed.load_state_dict(cb.state_dict())
    trainer.saved.clear()
    _epoch(trainer, resumed, 1, 0.65, 0.9, 0.9)  # worse than before the interruption
    assert trainer.saved == [] and resumed.best_epoch == 0


def test_ignores_sanity_check_and_plain_validate(tmp_path):
    cb, trainer = BestAverageAccuracy(dirpath=str(tmp_path)), _Trainer()
    trainer.sanity_checking = True
    _epoch(trainer, cb, 0, 0.9, 0.9, 0.9)
    trainer.sanity_checking, trainer.state.fn = False, "validate"
    _epoch(trainer, cb, 0, 0.9, 0.9, 0.9)
    assert trainer.saved == []


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    trainer = _Trainer()
    target = tmp_path / "last.ckpt"
    save_checkpoint_atomically(trainer, target)
    assert target.read_text() == "0"

    def dies_half_way(path, weights_only=False):
        path.write_text("half-writ")
        raise KeyboardInterrupt  # the process is stopped mid-save

    trainer.save_checkpoint = dies_half_way
    trainer.current_epoch = 1
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomically(trainer, target)
    assert target.read_text() == "0"  # the previous checkpoint is intact


@pytest.mark.slow
def test_non_finite_loss_stops_training_naming_the_task():
    # Checked every 3 batches: no host read per step, the error within 3 batches.
    module = VisionCareModule(
        backbone="test_efficientnet", channels_last=False, nonfinite_check_every=3
    )
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    module.log_dict = lambda *args, **kwargs: None
    with torch.no_grad():
        module.net.heads["dme"][1].bias.fill_(float("nan"))
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "dr": torch.tensor([0, 1]),
        "dme": torch.tensor([0, 2]),
        "source": torch.tensor([0, 0]),
    }
    module.training_step(batch, 0)
    module.training_step(batch, 1)
    with pytest.raises(TrainingDivergedError, match=r"task: dme\) at epoch 0, batches 0-2"):
        module.training_step(batch, 2)
    # An epoch shorter than the check interval is checked after its last batch, before any
    # epoch-end checkpoint.
    module._trainer = SimpleNamespace(current_epoch=0, num_training_batches=2, max_steps=-1)
    module.training_step(batch, 0)
    module.training_step(batch, 1)
    with pytest.raises(TrainingDivergedError, match=r"task: dme\) at epoch 0, batches 0-1"):
        module.on_train_batch_end(None, batch, 1)
