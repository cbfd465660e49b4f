"""On-disk cache of preprocessed images, shared by every run and sweep job.

Each image is preprocessed once and stored as an uncompressed ``.npy``: loading costs a fraction
of a millisecond, far less than decoding and resizing a full-size fundus JPEG (bench/data_loading.py
measures both).
Entries are keyed by the source file's identity (resolved path, size, modification time) and the
preprocessing parameters, so a changed file or parameter gives a new entry and an unchanged one is
reused. Writes are atomic (temporary file + rename): a killed build never leaves a half-written
entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from visioncare.data.preprocess import PreprocessConfig, UnreadableImageError, prepare
from visioncare.utils.cpus import usable_cpus
from visioncare.utils.progress import progress_bar

log = logging.getLogger(__name__)


class PreprocessedCache:
    """Preprocessed images under ``root/<parameter hash>/``.

    Args:
        root: cache folder (`data.cache_dir`).
        config: preprocessing parameters.
    """

    def __init__(self, root: str | Path, config: PreprocessConfig) -> None:
        self.config = config
        params = json.dumps(config.as_dict(), sort_keys=True)
        self.root = Path(root).expanduser()
        self.folder = self.root / hashlib.sha1(params.encode()).hexdigest()[:12]

    def path_for(self, image: str | Path) -> Path:
        """Where the preprocessed copy of ``image`` lives (whether or not it exists yet)."""
        source = Path(image).resolve()
        stat = source.stat()
        identity = f"{source}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha1(identity.encode()).hexdigest()[:20]
        return self.folder / digest[:2] / f"{digest}.npy"

    def build(
        self, images: Sequence[str | Path], num_workers: int | None = None
    ) -> tuple[dict[Path, Path], dict[Path, str]]:
        """Preprocess the images not cached yet, in parallel threads (OpenCV releases the GIL).

        Returns:
            (source → cache file for every readable image, source → error for the unreadable ones)
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "params.json").write_text(json.dumps(self.config.as_dict(), indent=2))
        entries: dict[Path, Path] = {}
        errors: dict[Path, str] = {}
        todo: list[tuple[Path, Path]] = []
        for image in images:
            source = Path(image)
            try:
                target = self.path_for(source)
            except OSError as exc:
                errors[source] = f"{source}: {exc.strerror or exc}"
                continue
            if target.exists():
                entries[source] = target
            else:
                todo.append((source, target))
        if todo:
            workers = num_workers or usable_cpus()
            unlocated: list[Path] = []
            bar = progress_bar(transient=True)
            with ThreadPoolExecutor(max_workers=workers) as pool, bar:
                task = bar.add_task(f"Caching {len(todo)} images", total=len(todo))
                for source, target, error, located in pool.map(self._build_one, todo):
                    if error is None:
                        entries[source] = target
                        if not located:
                            unlocated.append(source)
                    else:
                        errors[source] = error
                    bar.advance(task)
            log.info("Cached %d images in %s", len(todo) - len(errors), self.folder)
            if unlocated:
                # Not an error (the photo is kept, padded whole), but worth a look.
                listed = ", ".join(str(p) for p in unlocated[:5])
                more = f" and {len(unlocated) - 5} more" if len(unlocated) > 5 else ""
                log.warning(
                    "No fundus field found in %d image(s), cached uncropped: %s%s. See what the "
                    "network sees with `python src/preprocess.py input=<folder>`.",
                    len(unlocated),
                    listed,
                    more,
                )
        return entries, errors

    def _build_one(self, job: tuple[Path, Path]) -> tuple[Path, Path, str | None, bool]:
        """(source, cache file, error or None, whether the fundus field was found)."""
        source, target = job
        try:
            prepared = prepare(source, self.config)
        except UnreadableImageError as exc:
            return source, target, str(exc), False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.{id(job)}.tmp.npy")
        np.save(tmp, prepared.image)
        os.replace(tmp, target)
        return source, target, None, prepared.field is not None or not self.config.crop_fundus


def load_cached(path: str | Path) -> np.ndarray:
    """Read one cached image (RGB uint8)."""
    return np.load(path)
