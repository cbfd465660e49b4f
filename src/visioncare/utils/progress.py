"""The one progress bar of caching, preprocessing, batch prediction and Grad-CAM: all look alike."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(transient: bool = False) -> Progress:
    """A rich bar: description, bar, done/total, elapsed time; ``transient`` clears it when done."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=transient,
    )
