"""The random-generator state a checkpoint carries, so a resumed run draws what it would have.

Dropout draws from the global generators. Only this process's own generators are stored — the
CPU one and the CUDA generator of the device this process trains on — never one state per visible
GPU: `torch.cuda.set_rng_state_all` fails with an IndexError when a checkpoint written by a rank
that saw eight GPUs is resumed on a machine with fewer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("visioncare")


def capture_rng_state() -> dict[str, Any]:
    """``{"torch": CPU state, "cuda": this process's device state or None}``."""
    cuda = None
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state(torch.cuda.current_device())
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore `capture_rng_state`'s output onto this process's CPU and current CUDA device.

    Checkpoints from before this format hold a list with one CUDA state per visible GPU; the
    entry of this process's device index is used when it exists, none otherwise.
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):
        if device >= len(cuda):
            log.info("Checkpoint has no CUDA RNG state for device %d; keeping this one", device)
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)
