"""The notebooks in notebooks/ run headless (nbclient) on small parameters and ship stripped."""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

from visioncare.tasks.train import run as train

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_data", "02_schedule", "03_results"]


def _load(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _execute(name: str, parameters: str, cwd: Path) -> tuple:
    """Run a notebook with its first code cell replaced by ``parameters``; return it."""
    nb = _load(name)
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    first.source = parameters
    # Which interpreter the kernel runs: must be this (venv) interpreter.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def _images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


def _check(nb) -> None:
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert _images(nb) >= 1
    prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_stripped(name):
    nb = _load(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and any(cell.cell_type == "markdown" for cell in nb.cells)
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_data_notebook(tmp_path):
    _check(_execute("01_data", "IMAGE_SIZE = 96\nN_PER_GRADE = 1\nSEED = 0", tmp_path))


@pytest.mark.slow
def test_schedule_notebook(tmp_path):
    params = 'OVERRIDES = ["model=tiny", "trainer.max_epochs=6", "unfreeze_step=1"]'
    # Run from a subfolder of the repo: the notebook must find conf/ by walking up.
    nb = _execute("02_schedule", params, NOTEBOOKS)
    _check(nb)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "backbone_top" in text and "stage 3" in text


@pytest.mark.slow
def test_results_notebook(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=2", "logger=none")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "metrics.csv").is_file()
    nb = _execute("03_results", f"RUN_DIR = {str(run_dir)!r}", tmp_path)
    _check(nb)
    # Three curves plus four confusion matrices (val/test x DR/DME).
    assert _images(nb) >= 7
