"""Which torch device a command runs on: `device=auto|cpu|cuda|cuda:N|mps`, parsed once here
for predict and eval, and as the Lightning Trainer's accelerator and devices."""

from __future__ import annotations

import torch

from visioncare.errors import ConfigurationError


def resolve_device(device: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigurationError(f"device={device!r} is not a torch device: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device=cuda but CUDA is not available; use device=auto or cpu")
    return resolved


def trainer_device(device: str | torch.device) -> tuple[str, int | list[int]]:
    """A torch device (`device=` of eval.py, a model's device) as the Trainer's accelerator and
    devices: ``cuda:1`` must stay GPU 1, which ``devices=1`` (the first GPU) would not be."""
    resolved = torch.device(device)
    if resolved.type == "cuda":
        return "cuda", 1 if resolved.index is None else [resolved.index]
    if resolved.type in ("cpu", "mps"):
        return resolved.type, 1
    raise ConfigurationError(
        f"device={device!s} is not supported for evaluation; use auto, cpu, cuda, cuda:N or mps"
    )
