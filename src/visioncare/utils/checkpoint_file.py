"""Adding records to a checkpoint file after training (calibration, operating points)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch


def update_checkpoint(ckpt_path: str | Path, entries: Mapping[str, object | None]) -> None:
    """Set each entry of a checkpoint file (None removes it), replacing the file atomically.

    Loaded with weights_only=True: the records written here are plain data, and loading never
    runs pickled code. A kill during the write leaves the previous file intact.
    """
    path = Path(ckpt_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in entries.items():
        if value is None:
            checkpoint.pop(key, None)
        else:
            checkpoint[key] = value
    partial = path.with_suffix(path.suffix + ".tmp")
    torch.save(checkpoint, partial)
    os.replace(partial, path)
