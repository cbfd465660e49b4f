"""One process prepares the data, the others wait for it: `exclusive_preparation`.

Under torchrun or `srun` every rank starts the same script at the same moment, before any process
group exists (Lightning's own `prepare_data` barrier comes later). Without a lock every rank would
render the synthetic set and build the cache at once: the same work N times over on the same
cores. A lock file beside the cache serialises them: the first process does the work, the others
block until it is done and then find everything ready. On a shared filesystem that is once per
filesystem, on node-local disks once per node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

LOCK_NAME = ".prepare.lock"


@contextmanager
def exclusive_preparation(folder: str | Path) -> Iterator[None]:
    """Hold ``folder/.prepare.lock`` while the body runs, waiting for another holder first.

    Filesystems without `flock` support (some Lustre mounts) run the body unlocked: every write
    of the preparation is atomic on its own, so concurrent builds stay correct, only slower.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Another process is preparing the data (%s); waiting for it", lock.lock_file)
            lock.acquire()
    except NotImplementedError:
        log.warning("No file locking on %s; preparing the data without a lock", folder)
        yield
        return
    try:
        yield
    finally:
        lock.release()
