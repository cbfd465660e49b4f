"""Where Lightning's training loop stands, for hooks that act once per epoch."""

from __future__ import annotations

from typing import Any


def epoch_ends_after(trainer: Any, batch_idx: int) -> bool:
    """Whether the training batch ``batch_idx`` is the epoch's last one.

    The planned last batch, or the one that reaches ``trainer.max_steps`` (Lightning stops the
    epoch there). Called from ``on_train_batch_end``, after the batch's optimizer step.
    """
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps
