"""The reproducibility record of a run: which code (git commit, dirty tree) and which packages.

A number in summary.json can be reproduced only with the same code and library versions; the
record is taken when the run ends, from the checkout the code was imported from.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import visioncare

# The distributions whose versions change results (distribution names, as pip knows them).
PACKAGES = (
    "torch",
    "lightning",
    "timm",
    "torchmetrics",
    "hydra-core",
    "albumentations",
    "numpy",
    "visioncare",
)


def _source_root() -> Path:
    """The checkout: VISIONCARE_ROOT when set (entry scripts set it), else above the package."""
    root = os.environ.get("VISIONCARE_ROOT")
    return Path(root) if root else Path(visioncare.__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """Installed version of each of `PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def reproducibility_record(root: Path | None = None) -> dict[str, Any]:
    """{"git_commit", "git_dirty", "python", "packages"}; commit/dirty None outside a checkout.

    ``git_dirty`` is true when tracked or untracked files differ from the commit: the numbers
    then came from code that no commit holds.
    """
    root = root or _source_root()
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": None if status is None else bool(status.strip()),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
