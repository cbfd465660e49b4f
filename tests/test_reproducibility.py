"""summary.json's reproducibility record: commit, dirty flag, python and package versions."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata

import pytest

from tests.conftest import ROOT
from visioncare.runs.reproducibility import PACKAGES, reproducibility_record


def test_record_names_the_commit_and_versions():
    record = reproducibility_record(ROOT)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert record["git_commit"] == head
    assert isinstance(record["git_dirty"], bool)
    assert set(record["packages"]) == set(PACKAGES)
    assert record["packages"]["torch"] == metadata.version("torch")
    assert record["python"].count(".") == 2


def test_outside_a_checkout_commit_is_none(tmp_path):
    record = reproducibility_record(tmp_path)
    assert record["git_commit"] is None and record["git_dirty"] is None


@pytest.mark.slow
def test_training_summary_has_the_record(tiny_checkpoint):
    summary = json.loads((tiny_checkpoint.parents[1] / "summary.json").read_text())
    record = summary["reproducibility"]
    assert record["git_commit"] and record["packages"]["lightning"]
