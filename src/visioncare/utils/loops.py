"""Where Lightning's training loop stands, for hooks that act once per epoch."""

from __future__ import annotations

from typing import Any


def epoch_ends_after(trainer: Any, batch_idx: int) -> bool:
    """Whether the training batch ``batch_idx`` is the epoch's last one.

    The planned last batch, the one that reaches ``trainer.max_steps`` (Lightning stops the
    epoch there), or one after which a callback asked the run to stop (``trainer.should_stop``,
    e.g. Lightning's `Timer`; seen by hooks that run after that callback's). Called from
    ``on_train_batch_end``, after the batch's optimizer step.
    """
    if batch_idx + 1 >= trainer.num_training_batches or getattr(trainer, "should_stop", False):
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps
