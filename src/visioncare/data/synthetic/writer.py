"""The dataset on disk: IDRiD's Disease Grading layout, the manifest, reuse and a safe install.

Everything that touches the filesystem lives here: which files a set of parameters promises, the
manifest that lets an identical set be reused without rendering, the rendering workers (spawned;
each image's pixels depend only on (seed, split, index)), and the build-in-a-temp-folder-then-
rename install that leaves nothing complete-looking after an interruption. Temp folders carry the
host and process id, so nodes sharing a filesystem never delete each other's builds. The folder,
file and column names come from `visioncare.data.sources.idrid_layout`, the copy the IDRiD
loader reads with.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from visioncare.data.sources.idrid_layout import COLUMNS, GRADING, IMAGES, LABELS, SPLITS
from visioncare.data.synthetic.difficulty import Difficulty
from visioncare.data.synthetic.grades import _grader_labels, sample_grades
from visioncare.data.synthetic.render import _MIN_IMAGE_SIZE, render_fundus
from visioncare.utils.cpus import usable_cpus

log = logging.getLogger(__name__)

SYNTHETIC_MANIFEST = "visioncare_synthetic.json"
# Bump whenever the rendered pixels or the layout change, so cached datasets are rebuilt.
GENERATOR_VERSION = 1

# The published CSV really carries the trailing space after "edema".
_CSV_HEADER = ",".join((COLUMNS["image"], COLUMNS["dr"], COLUMNS["dme"])) + " "
_JPEG_QUALITY = 95


def _image_names(n: int) -> list[str]:
    """IDRiD_001 ... with three digits as in IDRiD, wider only when n needs it."""
    width = max(3, len(str(n)))
    return [f"IDRiD_{i:0{width}d}" for i in range(1, n + 1)]


def _expected_files(root: Path, num_train: int, num_test: int) -> list[Path]:
    grading = root / GRADING
    files = []
    for split, n in (("train", num_train), ("test", num_test)):
        layout = SPLITS[split]
        files.append(grading / LABELS / layout.labels)
        files += [grading / IMAGES / layout.images / f"{name}.jpg" for name in _image_names(n)]
    return files


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """The manifest matches ``params`` and every file it promises is present."""
    try:
        manifest = json.loads((root / SYNTHETIC_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return False
    return all(p.is_file() for p in _expected_files(root, params["num_train"], params["num_test"]))


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok = cv2.imwrite(
        str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    )
    if not ok:
        raise OSError(f"could not write {path}")


_Job = tuple[str, int, int, int, int, int, int, Difficulty]


def _render_job(job: _Job) -> None:
    """Render and save one image; the seed depends only on (seed, split, index)."""
    path, split_index, image_index, dr, dme, image_size, seed, difficulty = job
    rng = np.random.default_rng([seed, split_index, image_index])
    _write_jpeg(Path(path), render_fundus(dr, dme, image_size, rng, difficulty))


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _render_all(jobs: list[_Job], num_workers: int) -> None:
    workers = min(num_workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            _render_job(job)
        return
    # spawn, never fork: a parent that already ran OpenCV/OpenMP thread pools (any test or
    # training process) forks children that deadlock on the copied pool locks. The package
    # __init__ files import nothing heavy, so a spawned worker starts quickly.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, len(jobs) // (workers * 8))
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            for _ in pool.map(_render_job, jobs, chunksize=chunksize):
                pass
    except BrokenProcessPool:
        # E.g. called from a script without an `if __name__ == "__main__":` guard (spawned
        # workers re-run it and die) or a worker killed for memory. Output is deterministic,
        # so rendering everything again in-process gives the same files, only slower.
        log.warning("Rendering workers died; rendering %d images in-process instead", len(jobs))
        for job in jobs:
            _render_job(job)


def _build(
    tmp: Path, params: dict[str, Any], num_workers: int, difficulty: Difficulty | None = None
) -> None:
    """Write the whole dataset into ``tmp``, the manifest last.

    With label noise the CSVs hold the grader's (noisy) grades and the manifest counts how
    many differ from the rendered ones.
    """
    difficulty = difficulty or Difficulty()
    relabelled: dict[str, int] = {}
    grading = tmp / GRADING
    (grading / LABELS).mkdir(parents=True)
    jobs = []
    counts: dict[str, dict[str, list[int]]] = {}
    splits = (("train", params["num_train"], 0), ("test", params["num_test"], 1))
    for split, n, offset in splits:
        folder = grading / IMAGES / SPLITS[split].images
        folder.mkdir(parents=True)
        grades = sample_grades(n, params["seed"] + offset)
        names = _image_names(n)
        written = grades
        if difficulty.label_noise > 0:
            noise_rng = np.random.default_rng([params["seed"], offset, 7])
            written = _grader_labels(grades, difficulty.label_noise, noise_rng)
        relabelled[split] = sum(a != b for a, b in zip(grades, written, strict=True))
        rows = [_CSV_HEADER] + [
            f"{nm},{dr},{dme}" for nm, (dr, dme) in zip(names, written, strict=True)
        ]
        (grading / LABELS / SPLITS[split].labels).write_text("\n".join(rows) + "\n")
        counts[split] = {
            "dr": [sum(g[0] == k for g in written) for k in range(5)],
            "dme": [sum(g[1] == k for g in written) for k in range(3)],
        }
        for i, (nm, (dr, dme)) in enumerate(zip(names, grades, strict=True)):
            path = str(folder / f"{nm}.jpg")
            size, seed = params["image_size"], params["seed"]
            jobs.append((path, offset, i, dr, dme, size, seed, difficulty))
    _render_all(jobs, num_workers)
    manifest = {
        "generator": "visioncare.data.synthetic",  # the package, not this module: kept stable
        "params": params,
        "class_counts": counts,
        "layout": f"IDRiD {GRADING}",
    }
    if not difficulty.is_standard:
        manifest["relabelled_by_grader_noise"] = relabelled
    (tmp / SYNTHETIC_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _install(tmp: Path, root: Path) -> None:
    """Move the finished build into ``root`` so that no interruption leaves a fake-complete set.

    A fresh or empty ``root`` is replaced by one rename. Otherwise the old grading folder is
    swapped out first and the new manifest moved in last: until then the old manifest's
    parameters no longer match, so an interrupted swap is simply rebuilt next time.
    """
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
        return
    trash = root.parent / f".{root.name}.old-{_owner_tag()}"
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    if (root / GRADING).exists():
        os.replace(root / GRADING, trash / GRADING)
    os.replace(tmp / GRADING, root / GRADING)
    os.replace(tmp / SYNTHETIC_MANIFEST, root / SYNTHETIC_MANIFEST)
    shutil.rmtree(trash, ignore_errors=True)


def _owner_tag() -> str:
    """``<host>-<pid>``: who a temp build belongs to. A process id means nothing on another node
    sharing the filesystem, so the host is part of the name."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _remove_stale_temp_dirs(root: Path) -> None:
    """Delete temp builds of ``root`` left behind by processes of this host that no longer exist.

    Builds of other hosts (and of older versions, named without a host) are left alone: their
    process cannot be checked from here and may be rendering right now.
    """
    if not root.parent.is_dir():
        return
    host, _, _ = _owner_tag().rpartition("-")
    for kind in ("tmp", "old"):
        prefix = f".{root.name}.{kind}-"
        for path in root.parent.glob(f"{prefix}*"):
            owner, _, pid = path.name[len(prefix) :].rpartition("-")
            if owner != host or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # alive but owned by someone else


def generate_synthetic_idrid(
    root: str | Path,
    num_train: int = 413,
    num_test: int = 103,
    image_size: int = 512,
    seed: int = 0,
    num_workers: int | None = None,
    difficulty: Difficulty | None = None,
) -> Path:
    """Write (or reuse) the dataset under root in IDRiD layout; return root as a Path.

    Reuses a complete dataset with the same parameters without rendering anything; rebuilds
    one made with other parameters (deleting only this generator's files); refuses to touch
    a non-empty folder that this generator did not write.

    Args:
        root: Dataset folder (what the IDRiD loader is pointed at).
        num_train: Training images (IDRiD has 413).
        num_test: Test images (IDRiD has 103); numbering restarts at 001 as in IDRiD.
        image_size: Side of the square images in pixels.
        seed: Seed for grades and pixels. Image ``i`` (0-based) of split ``s`` (0 train,
            1 test) is drawn from ``default_rng([seed, s, i])``, so the output does not depend
            on ``num_workers``.
        num_workers: Rendering processes; None = the CPUs this process may use
            (``os.cpu_count()`` unless an affinity mask says fewer), 0 or 1 = in-process.
        difficulty: lesion subtlety, camera spread and label noise (None = standard). A
            non-standard difficulty is part of the parameters a stored set must match.

    Raises:
        ValueError: On bad arguments or when ``root`` holds something else.
    """
    root = Path(root).expanduser().absolute()
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    difficulty = difficulty or Difficulty()
    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    if not difficulty.is_standard:  # standard sets written before the knob existed stay valid
        params["difficulty"] = asdict(difficulty)
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"data.root {root} is a file, not a folder; choose another data.root")
        if (root / SYNTHETIC_MANIFEST).is_file():
            if _is_complete(root, params):
                log.info("Reusing synthetic IDRiD dataset at %s", root)
                return root
        elif any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and holds something that is not a VisionCare synthetic "
                f"dataset (no {SYNTHETIC_MANIFEST}); refusing to overwrite it. Choose another "
                "data.root for the synthetic data, or point the real IDRiD loader at this folder."
            )
    workers = usable_cpus() if num_workers is None else int(num_workers)
    _remove_stale_temp_dirs(root)
    tmp = root.parent / f".{root.name}.tmp-{_owner_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n = num_train + num_test
    log.info("Rendering %d synthetic fundus images (%d px) into %s", n, image_size, root)
    try:
        _build(tmp, params, workers, difficulty)
        if _is_complete(root, params):  # another process finished the same build first
            return root
        try:
            _install(tmp, root)
        except OSError:
            if not _is_complete(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Synthetic dataset ready in %.1f s", time.perf_counter() - start)
    return root
