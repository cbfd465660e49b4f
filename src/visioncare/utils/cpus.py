"""How many CPUs this process may use."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask (SLURM, cgroups, taskset), not the machine.

    A SLURM job on a 128-core node given 8 cores must not start 128 threads or workers.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
